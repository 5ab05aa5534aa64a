"""Everything that consumes committed steps: the reader, verification and watching."""
