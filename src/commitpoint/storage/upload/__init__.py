"""Streaming uploads to object stores: the piece buffers and request bodies S3 parts and GCS
chunks share, and the upload-session base both backends build on."""
