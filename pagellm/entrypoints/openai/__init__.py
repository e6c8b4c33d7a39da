"""The OpenAI-compatible server: `pagellm serve`."""
