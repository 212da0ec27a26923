"""The task files shipped with mlecs (read with importlib.resources)."""
