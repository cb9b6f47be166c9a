"""Request in, response out: the HTTP/REST and gRPC frontends."""
