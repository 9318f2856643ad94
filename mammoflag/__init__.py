"""mammoflag: human-in-the-loop study-level flags for mammography archives."""

__version__ = "0.1.0"
