"""Click entry points of the toolkit."""
