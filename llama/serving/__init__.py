"""Generation, the terminal chat and the HTTP server."""
