"""Streaming uploads to object stores: the piece buffers and request bodies S3 parts and GCS
chunks share, and the upload-session base both backends build on."""

from commitpoint.storage.upload.pieces import BufferBody, Piece
from commitpoint.storage.upload.session import UploadSession, bucket_key, request_deadline

__all__ = ["BufferBody", "Piece", "UploadSession", "bucket_key", "request_deadline"]
