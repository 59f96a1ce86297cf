#!/usr/bin/env bash
# Bring up LasagneEngine on this host with Docker Compose: the one command of docs/deploy.md.
#
# The first run creates .env next to this script from .env.example, with a random value for every
# secret left empty there, readable by its owner only. Later runs keep .env as it is. Extra
# arguments go to "docker compose up", for example --no-build.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
env_file="$here/.env"

random_secret() {
    # 32 characters from [A-Za-z0-9], because tokens must be printable ASCII without spaces. tr
    # ends on SIGPIPE once head has its 32, which pipefail must not turn into a failure.
    (set +o pipefail; LC_ALL=C tr -dc 'A-Za-z0-9' < /dev/urandom | head -c 32)
}

if [[ ! -e "$env_file" ]]; then
    umask 077
    while IFS= read -r line || [[ -n "$line" ]]; do
        if [[ "$line" =~ ^([A-Z_]*(TOKEN|PASSWORD))=$ ]]; then
            line="${BASH_REMATCH[1]}=$(random_secret)"
        fi
        printf '%s\n' "$line"
    done < "$here/.env.example" > "$env_file"
    echo "Created $env_file with random secrets; clients need its LASAGNE_ENGINE_TOKEN." >&2
fi

exec docker compose --project-directory "$here" --file "$here/docker-compose.yml" --env-file "$env_file" \
    up --detach --build --wait "$@"
