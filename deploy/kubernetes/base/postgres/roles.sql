-- The PostgreSQL roles of endpoint-stats and what each may do. The one source of truth: the
-- Kubernetes Job endpoint-stats-db-roles (ConfigMap postgres-roles) and the local stack
-- (scripts/local-stack.sh) both run this file through apply-roles.sh beside it, as a superuser
-- (or a managed database's admin role), connected to the service's database. Idempotent: it
-- creates what is missing and resets the rest, so it runs again after a password change, an
-- upgrade or a restore (docs/deployment.md, "Database roles").
--
--   endpoint_stats_owner    owns the database, the schema's tables and _sqlx_migrations; runs
--                           `migrate` (init container), `maintain` (VACUUM needs the owner) and
--                           `restore` (drops and recreates the tables)
--   endpoint_stats_app      the service (`serve`, `check`): SELECT/INSERT/UPDATE on its tables,
--                           SELECT on _sqlx_migrations (readiness); no DDL, no DELETE, no TEMP
--   endpoint_stats_backup   `backup` (pg_dump): SELECT only
--   endpoint_stats_verify   `verify-backup`: CREATEDB, to create and drop its scratch database
--                           (it owns that database and what it restores into it); nothing here
--   endpoint_stats_monitor  postgres_exporter: pg_monitor (statistics views), nothing else
--
-- Passwords come from the environment (psql \getenv, never the command line), set by
-- apply-roles.sh from the roles' DATABASE_URLs: ROLE_PASSWORD_OWNER, _APP, _BACKUP, _VERIFY,
-- _MONITOR. A missing one leaves its :'variable' unexpanded, a syntax error: the file stops.
\set ON_ERROR_STOP on
\getenv owner_password ROLE_PASSWORD_OWNER
\getenv app_password ROLE_PASSWORD_APP
\getenv backup_password ROLE_PASSWORD_BACKUP
\getenv verify_password ROLE_PASSWORD_VERIFY
\getenv monitor_password ROLE_PASSWORD_MONITOR
SELECT current_database() AS dbname \gset

BEGIN;

-- Roles: created when missing, then every attribute set explicitly (no superuser, no
-- inheritance of anything not granted here).
SELECT format('CREATE ROLE %I', r)
  FROM unnest(ARRAY['endpoint_stats_owner', 'endpoint_stats_app', 'endpoint_stats_backup',
                    'endpoint_stats_verify', 'endpoint_stats_monitor']) AS r
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) \gexec
ALTER ROLE endpoint_stats_owner  LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD :'owner_password';
ALTER ROLE endpoint_stats_app    LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD :'app_password';
ALTER ROLE endpoint_stats_backup LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD :'backup_password';
ALTER ROLE endpoint_stats_verify LOGIN NOSUPERUSER CREATEDB   NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD :'verify_password';
ALTER ROLE endpoint_stats_monitor LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD :'monitor_password';
GRANT pg_monitor TO endpoint_stats_monitor;

-- The database: owned by the owner role (so, on PostgreSQL 15+, is the schema public, through
-- pg_database_owner); others may connect, nobody else creates temporary tables or schemas.
ALTER DATABASE :"dbname" OWNER TO endpoint_stats_owner;
REVOKE ALL ON DATABASE :"dbname" FROM PUBLIC;
GRANT CONNECT ON DATABASE :"dbname"
   TO endpoint_stats_app, endpoint_stats_backup, endpoint_stats_verify, endpoint_stats_monitor;

-- The schema: only the owner creates objects in it.
REVOKE ALL ON SCHEMA public FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO endpoint_stats_owner;
GRANT USAGE ON SCHEMA public TO endpoint_stats_app, endpoint_stats_backup;

-- Tables made before the owner role existed (the service used to run as the superuser, and
-- created them) pass to the owner.
DO $$
DECLARE t record;
BEGIN
  FOR t IN SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')
              AND pg_get_userbyid(c.relowner) <> 'endpoint_stats_owner'
  LOOP
    EXECUTE format('ALTER TABLE public.%I OWNER TO endpoint_stats_owner', t.relname);
  END LOOP;
END
$$;

-- Tables and sequences the owner creates later (every future migration) are granted as they are
-- created; the same grants for what exists already.
ALTER DEFAULT PRIVILEGES FOR ROLE endpoint_stats_owner IN SCHEMA public
  GRANT SELECT, INSERT, UPDATE ON TABLES TO endpoint_stats_app;
ALTER DEFAULT PRIVILEGES FOR ROLE endpoint_stats_owner IN SCHEMA public
  GRANT SELECT ON TABLES TO endpoint_stats_backup;
ALTER DEFAULT PRIVILEGES FOR ROLE endpoint_stats_owner IN SCHEMA public
  GRANT USAGE, SELECT ON SEQUENCES TO endpoint_stats_app;
ALTER DEFAULT PRIVILEGES FOR ROLE endpoint_stats_owner IN SCHEMA public
  GRANT SELECT ON SEQUENCES TO endpoint_stats_backup;
GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO endpoint_stats_app;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO endpoint_stats_backup;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO endpoint_stats_app;
GRANT SELECT ON ALL SEQUENCES IN SCHEMA public TO endpoint_stats_backup;

-- sqlx's bookkeeping table, made here (the DDL sqlx 0.8 uses; its migrator creates it only if
-- missing) so that the service can read it for readiness but never write it: the default
-- privileges above would grant INSERT/UPDATE on it to the service.
CREATE TABLE IF NOT EXISTS public._sqlx_migrations (
    version BIGINT PRIMARY KEY,
    description TEXT NOT NULL,
    installed_on TIMESTAMPTZ NOT NULL DEFAULT now(),
    success BOOLEAN NOT NULL,
    checksum BYTEA NOT NULL,
    execution_time BIGINT NOT NULL
);
ALTER TABLE public._sqlx_migrations OWNER TO endpoint_stats_owner;
REVOKE ALL ON public._sqlx_migrations FROM endpoint_stats_app, endpoint_stats_backup;
GRANT SELECT ON public._sqlx_migrations TO endpoint_stats_app, endpoint_stats_backup;

COMMIT;
