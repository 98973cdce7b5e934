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
