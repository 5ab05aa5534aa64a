"""Rules that hold on any store: layout, manifests, the pointer compare-and-swap loop, the writer
lease, checksums and the retry/deadline helper. Built only on the storage protocol."""
