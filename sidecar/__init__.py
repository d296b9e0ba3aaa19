"""creditgate: prepaid, credit-based billing in front of OpenAI-compatible LLM APIs."""

__version__ = "0.1.0"
