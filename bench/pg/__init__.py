"""A real-database workload: the PostgreSQL gateway against its peers (`python -m bench.pg`)."""
