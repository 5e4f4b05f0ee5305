"""`batchctl`: the command line for users (over the HTTP API) and operators (from the database)."""
