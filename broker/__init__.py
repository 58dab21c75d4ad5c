"""medbroker: approved, time-limited, recorded SSH access to hospital medical devices."""
__version__ = "0.1.0"
