"""One router per concern; each route parses input, calls one query or service, maps the result."""
