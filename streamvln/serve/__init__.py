"""`streamvln-serve`: the streaming agent behind an authenticated HTTP service, its clients and its simulator driver."""
