#!/usr/bin/env bash
# The secret files docker-compose.yml reads (compose `secrets:`), made once with random passwords:
#   secrets/postgres_password, secrets/hapi_db_password   the two PostgreSQL servers' passwords
#   secrets/orthanc_registered_users                      the integration Orthanc's user {"strokewatch": "<password>"}
#   secrets/strokewatch/                                  the engine's secrets directory (STROKEWATCH_SECRETS_DIR)
#     database_url                                        postgresql+psycopg://strokewatch:<password>@postgres:5432/strokewatch
#     pacs__auth__password                                the same Orthanc password, for the engine
# Add other secret settings as files there, named as deploy/settings.env says (ehr__auth__client_secret, ...).
# Existing files are kept. The engine runs as uid 10001: the directory and files are made readable by that group
# (when this runs as root) or by everyone on this host otherwise; keep ./secrets on a host only admins log in to.
set -euo pipefail
cd "$(dirname "$0")/../.."
umask 077
mkdir -p secrets/strokewatch
random() { python3 -c 'import secrets; print(secrets.token_urlsafe(32))'; }
[ -s secrets/postgres_password ] || random > secrets/postgres_password
[ -s secrets/hapi_db_password ] || random > secrets/hapi_db_password
if [ ! -s secrets/strokewatch/database_url ]; then
  printf 'postgresql+psycopg://strokewatch:%s@postgres:5432/strokewatch\n' "$(cat secrets/postgres_password)" \
    > secrets/strokewatch/database_url
fi
if [ ! -s secrets/strokewatch/pacs__auth__password ]; then
  random > secrets/strokewatch/pacs__auth__password
fi
if [ ! -s secrets/orthanc_registered_users ]; then
  printf '{"strokewatch": "%s"}\n' "$(cat secrets/strokewatch/pacs__auth__password)" > secrets/orthanc_registered_users
fi
if [ "$(id -u)" = 0 ]; then
  chgrp -R 10001 secrets/strokewatch && chmod 0750 secrets/strokewatch && chmod 0640 secrets/strokewatch/*
  chmod 0755 secrets
  chmod 0644 secrets/postgres_password secrets/hapi_db_password secrets/orthanc_registered_users  # the images' users
else
  chmod 0755 secrets secrets/strokewatch
  chmod 0644 secrets/strokewatch/* secrets/postgres_password secrets/hapi_db_password secrets/orthanc_registered_users
fi
echo "secrets in $(pwd)/secrets (not in git: .gitignore)"
