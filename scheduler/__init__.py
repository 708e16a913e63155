"""gpushare."""
