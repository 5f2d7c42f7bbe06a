"""Project tools: programs that build things the server uses (not imported by the server)."""
