#!/bin/sh
# Run once by the postgres image on an empty data directory (/docker-entrypoint-initdb.d):
# one database per service, because services share nothing but Kafka (docs/architecture.md §2).
# GPUTRACE_DATABASES lists them; docker-compose.yml sets it next to each service's DATABASE_URL.
set -eu
for db in ${GPUTRACE_DATABASES}; do
    echo "gputrace: creating database ${db}"
    psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER}" --dbname "${POSTGRES_DB}" \
        -c "CREATE DATABASE \"${db}\""
done

# The ledger's two roles (docs/ops.md, "The ledger's two roles"): the owner creates the tables and
# the append-only triggers; the run-time role may read and write rows but, not owning the tables,
# cannot drop or disable the triggers. Default privileges give it the tables the owner creates.
case " ${GPUTRACE_DATABASES} " in *" gputrace_ledger "*)
    echo "gputrace: creating the ledger's owner and run-time roles"
    psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER}" --dbname gputrace_ledger <<SQL
CREATE ROLE gputrace_ledger_owner LOGIN PASSWORD '${LEDGER_OWNER_PASSWORD:-${POSTGRES_PASSWORD}}';
CREATE ROLE gputrace_ledger_app LOGIN PASSWORD '${LEDGER_APP_PASSWORD:-${POSTGRES_PASSWORD}}';
ALTER DATABASE gputrace_ledger OWNER TO gputrace_ledger_owner;
ALTER SCHEMA public OWNER TO gputrace_ledger_owner;
GRANT CONNECT ON DATABASE gputrace_ledger TO gputrace_ledger_app;
GRANT USAGE ON SCHEMA public TO gputrace_ledger_app;
ALTER DEFAULT PRIVILEGES FOR ROLE gputrace_ledger_owner IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO gputrace_ledger_app;
ALTER DEFAULT PRIVILEGES FOR ROLE gputrace_ledger_owner IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO gputrace_ledger_app;
SQL
;;
esac
