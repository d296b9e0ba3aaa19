"""The billing portal: the web pages at /portal where an account's people see and steer their credits
(README "Billing portal"). Server-rendered HTML from the templates and static files in this package; the
pages call the project's service objects directly, never the HTTP API."""
