"""What deletes or moves back: retention and orphan collection, and rewind."""
