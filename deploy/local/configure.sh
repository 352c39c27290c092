#!/usr/bin/env bash
# The local stack's configuration, sourced by scripts/local-stack.sh (never run): configure writes
# every piece's configuration into the state directory at `up` (the repository's monitoring
# sources, transformed by transform-monitoring.py; the templates here rendered by stack-tool.py; a
# throwaway PostgreSQL cluster; Redis with a password), prepare_database creates the database,
# the roles and the schema once PostgreSQL runs. Uses local-stack.sh's variables (ports,
# passwords, paths, tools).

# render TEMPLATE OUT KEY=VALUE...: replaces @KEY@ (values may span lines)
render() { "$PYTHON" "$LOCAL/stack-tool.py" render "$@"; }

configure() {
  local i
  mkdir -p "$STACK_DIR"/{pids,logs,redis,sink,nginx/tmp,prometheus/data,alertmanager/data,alertmanager/secrets}
  chmod 755 "$STACK_DIR"

  # Slack webhooks, one per channel: the files of the Kubernetes Secret, here each holding a URL
  # of the sink whose path names the file, so that a post shows which webhook carried it.
  local webhook
  while read -r webhook; do
    echo "http://127.0.0.1:$SINK_PORT/services/local/$webhook" >"$STACK_DIR/alertmanager/secrets/$webhook"
  done < <(sed -n 's|.*api_url_file: */etc/alertmanager/secrets/\([A-Za-z0-9_.-]*\).*|\1|p' \
    "$MONITORING/alertmanager/alertmanager.yml" | sort -u)

  # Alertmanager: the repository's alertmanager.yml, api_url_file pointed at those files (and the
  # grouping timers shortened with --fast-alerts).
  local am_args=(alertmanager "$MONITORING/alertmanager/alertmanager.yml" "$STACK_DIR/alertmanager/alertmanager.yml"
    --webhook-dir "$STACK_DIR/alertmanager/secrets")
  ((FAST_ALERTS)) && am_args+=(--group-wait "$FAST_GROUP_WAIT" --group-interval "$FAST_GROUP_INTERVAL" --repeat-interval "$FAST_REPEAT_INTERVAL")
  "$PYTHON" "$LOCAL/transform-monitoring.py" "${am_args[@]}" 2>>"$STACK_DIR/logs/configure.log" \
    || { cat "$STACK_DIR/logs/configure.log" >&2; return 1; }
  amtool check-config "$STACK_DIR/alertmanager/alertmanager.yml" >>"$STACK_DIR/logs/configure.log" 2>&1 \
    || { stack_log "amtool check-config failed"; tail -20 "$STACK_DIR/logs/configure.log" >&2; return 1; }

  # Rules: the repository's files as they are, or (--fast-alerts) copies with short `for:`.
  local rules_glob="$MONITORING/prometheus/rules/*.yml" rule
  compgen -G "$rules_glob" >/dev/null || { stack_log "no rule files match $rules_glob"; return 1; }
  if ((FAST_ALERTS)); then
    mkdir -p "$STACK_DIR/prometheus/rules"
    for rule in "$MONITORING"/prometheus/rules/*.yml; do
      "$PYTHON" "$LOCAL/transform-monitoring.py" rules "$rule" "$STACK_DIR/prometheus/rules/$(basename "$rule")" \
        --for "$FAST_FOR" 2>>"$STACK_DIR/logs/configure.log" || { cat "$STACK_DIR/logs/configure.log" >&2; return 1; }
    done
    rules_glob="$STACK_DIR/prometheus/rules/*.yml"
  fi

  local scrape_targets=""
  for ((i = 1; i <= REPLICAS; i++)); do
    scrape_targets+="      - targets:
          - 127.0.0.1:$(replica_port "$i")
        labels:
          namespace: $NAMESPACE
          pod: endpoint-stats-$i
"
  done
  render "$LOCAL/prometheus.yml.tmpl" "$STACK_DIR/prometheus/prometheus.yml" \
    "SCRAPE_INTERVAL=$SCRAPE_INTERVAL" "RULES_GLOB=$rules_glob" "ALERTMANAGER_PORT=$ALERTMANAGER_PORT" \
    "REPLICA_TARGETS=${scrape_targets%$'\n'}" "POSTGRES_EXPORTER_PORT=$POSTGRES_EXPORTER_PORT" \
    "REDIS_EXPORTER_PORT=$REDIS_EXPORTER_PORT" "PROMETHEUS_PORT=$PROMETHEUS_PORT" "LB_PORT=$LB_PORT" \
    "NAMESPACE=$NAMESPACE" || return 1
  promtool check config "$STACK_DIR/prometheus/prometheus.yml" >>"$STACK_DIR/logs/configure.log" 2>&1 \
    || { stack_log "promtool check config failed"; tail -20 "$STACK_DIR/logs/configure.log" >&2; return 1; }

  local servers=""
  for ((i = 1; i <= REPLICAS; i++)); do
    servers+="        server 127.0.0.1:$(replica_port "$i") max_fails=1 fail_timeout=2s;
"
  done
  render "$LOCAL/nginx.conf.tmpl" "$STACK_DIR/nginx/nginx.conf" \
    "STATE=$STACK_DIR" "LB_PORT=$LB_PORT" "UPSTREAM_SERVERS=${servers%$'\n'}" || return 1
  "$NGINX_CMD" -t -q -c "$STACK_DIR/nginx/nginx.conf" -p "$STACK_DIR/nginx/" -e "$STACK_DIR/logs/nginx-error.log" \
    >>"$STACK_DIR/logs/configure.log" 2>&1 \
    || { stack_log "nginx -t failed"; tail -20 "$STACK_DIR/logs/configure.log" >&2; return 1; }

  # PostgreSQL: a throwaway cluster of its own.
  mkdir -p "$STACK_DIR/postgres"
  if ((${#PG_AS[@]})) && ! "${PG_AS[@]}" test -x "$STACK_DIR"; then
    stack_log "the postgres user cannot reach $STACK_DIR (a parent directory is not searchable): choose another --dir or chmod o+x its parents"
    return 1
  fi
  touch "$STACK_DIR/logs/postgres.log"
  if ((${#PG_AS[@]})); then chown postgres: "$STACK_DIR/postgres" "$STACK_DIR/logs/postgres.log"; fi
  # TCP (everything the stack runs) authenticates with scram-sha-256, so that the roles'
  # passwords are really checked; the Unix socket (mode 0700, in the state directory) trusts its
  # owner.
  local pwfile="$STACK_DIR/postgres/admin-password"
  (umask 077 && printf '%s\n' "$POSTGRES_ADMIN_PASSWORD" >"$pwfile")
  if ((${#PG_AS[@]})); then chown postgres: "$pwfile"; fi
  "${PG_AS[@]}" "$PG_BIN_DIR/initdb" -D "$STACK_DIR/postgres/data" -U postgres --auth-local=trust \
    --auth-host=scram-sha-256 --pwfile="$pwfile" -E UTF8 --no-sync >>"$STACK_DIR/logs/postgres.log" 2>&1 \
    || { rm -f "$pwfile"; stack_log "initdb failed"; log_tail postgres; return 1; }
  rm -f "$pwfile"

  # Redis requires the password (requirepass): in a file of mode 600, never on a command line.
  (umask 077 && printf '%s\n' "bind 127.0.0.1" "port $REDIS_PORT" "protected-mode yes" \
    "requirepass $REDIS_PASSWORD" 'save ""' "appendonly no" "dir $STACK_DIR/redis" "daemonize no" \
    >"$STACK_DIR/redis/redis.conf")
}

# The database after the server starts: the database, the roles (apply-roles.sh, as the
# administrator) and the migrations, applied as the schema's owner, like the Kubernetes Job
# endpoint-stats-db-roles and the service's init container `migrate`. Idempotent.
prepare_database() {
  (
    export PGUSER=postgres PGPASSWORD="$POSTGRES_ADMIN_PASSWORD"
    if [[ -z "$(psql -X -h 127.0.0.1 -p "$POSTGRES_PORT" -d postgres -tAc \
      "select 1 from pg_database where datname = 'endpoint_stats'")" ]]; then
      psql -X -h 127.0.0.1 -p "$POSTGRES_PORT" -d postgres -qc 'create database endpoint_stats'
    fi
    export OWNER_DATABASE_URL APP_DATABASE_URL="$DATABASE_URL" BACKUP_DATABASE_URL VERIFY_DATABASE_URL \
      MONITOR_DATABASE_URL ROLES_WAIT_SECS=20
    bash "$APPLY_ROLES"
  ) >>"$STACK_DIR/logs/roles.log" 2>&1 || { stack_log "database roles failed"; log_tail roles; return 1; }
  DATABASE_URL="$OWNER_DATABASE_URL" LOG_FORMAT=text RUST_LOG=info "$ENDPOINT_STATS_BIN" migrate \
    >>"$STACK_DIR/logs/migrate.log" 2>&1 || { stack_log "migrate (as endpoint_stats_owner) failed"; log_tail migrate; return 1; }
}
