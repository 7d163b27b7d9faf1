"""Phone and laptop device profiles and fit/speed estimates: issue #4, not implemented yet."""
