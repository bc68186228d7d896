"""Reading data: video decoding (the one place the toolkit decodes video) and datasets."""
