"""Documents and plans of the account: subscription plans (plans*.py, plan_*.py)."""
