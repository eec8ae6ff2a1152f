"""Policy: who may log in, who exists, where mail goes."""
