//! The worker's own SQL against a hostile role that can create objects in `public` (issue 34,
//! item 2). 0.2.1's start-up query called `quote_ident(current_user)` unqualified: a planted
//! `public.quote_ident(name)` matched better than `pg_catalog.quote_ident(text)` and ran as the
//! worker (outbox_relay + REPLICATION). Here shadows of the functions the worker's statements
//! call, each with an argument type that beats the catalog's by one cast, note every call in a
//! table; every command of the worker runs, and none may be called.

use std::path::Path;
use std::time::Duration;

use outbox_tests::postgres::count;
use outbox_tests::publish::{publish_range, Storage};
use outbox_tests::worker::run_once;
use outbox_tests::{eventually, PgCluster, Worker};

/// Functions a worker statement calls, shadowed in `public` with a closer argument type.
const SHADOWS: &str = "
    CREATE TABLE public.hijacked (by text, via text, at timestamptz DEFAULT now());
    GRANT INSERT, SELECT ON public.hijacked TO PUBLIC;
    CREATE FUNCTION public.note(via text) RETURNS void LANGUAGE sql
      AS $$ INSERT INTO public.hijacked (by, via) VALUES (current_user, via) $$;
    CREATE FUNCTION public.quote_ident(n name) RETURNS text LANGUAGE sql
      AS $$ SELECT public.note('quote_ident(name)'); SELECT pg_catalog.quote_ident(n::text) $$;
    CREATE FUNCTION public.pg_has_role(r regrole, p text) RETURNS boolean LANGUAGE sql
      AS $$ SELECT public.note('pg_has_role(regrole, text)'); SELECT pg_catalog.pg_has_role(r::oid, p) $$;
    CREATE FUNCTION public.has_table_privilege(c regclass, p text) RETURNS boolean LANGUAGE sql
      AS $$ SELECT public.note('has_table_privilege(regclass, text)'); SELECT pg_catalog.has_table_privilege(c::oid, p) $$;
    CREATE FUNCTION public.has_schema_privilege(s name, p text) RETURNS boolean LANGUAGE sql
      AS $$ SELECT public.note('has_schema_privilege(name, text)'); SELECT pg_catalog.has_schema_privilege(s::text, p) $$;
    CREATE FUNCTION public.to_jsonb(s pg_catalog.pg_replication_slots) RETURNS jsonb LANGUAGE sql
      AS $$ SELECT public.note('to_jsonb(pg_replication_slots)'); SELECT pg_catalog.to_jsonb(s) $$;
    CREATE FUNCTION public.to_jsonb(d outbox.dead_letters) RETURNS jsonb LANGUAGE sql
      AS $$ SELECT public.note('to_jsonb(outbox.dead_letters)'); SELECT pg_catalog.to_jsonb(d) $$;
    CREATE FUNCTION public.textlike_name(a name, b text) RETURNS boolean LANGUAGE sql
      AS $$ SELECT public.note('=(name, text)'); SELECT a::text OPERATOR(pg_catalog.=) b $$;
    CREATE OPERATOR public.= (LEFTARG = name, RIGHTARG = text, FUNCTION = public.textlike_name);
    CREATE FUNCTION public.pg_create_logical_replication_slot(s text, p text, OUT slot_name name, OUT lsn pg_lsn)
      LANGUAGE sql AS $$ SELECT public.note('pg_create_logical_replication_slot(text, text)');
                         SELECT * FROM pg_catalog.pg_create_logical_replication_slot(s::name, p::name) $$;
    CREATE FUNCTION public.pg_drop_replication_slot(s text) RETURNS void
      LANGUAGE sql AS $$ SELECT public.note('pg_drop_replication_slot(text)');
                         SELECT pg_catalog.pg_drop_replication_slot(s::name) $$;
    CREATE FUNCTION public.unnest(a text[]) RETURNS SETOF text
      LANGUAGE sql AS $$ SELECT public.note('unnest(text[])'); SELECT * FROM pg_catalog.unnest(a) $$;
    CREATE FUNCTION public.format(f text, a name, b name) RETURNS text
      LANGUAGE sql AS $$ SELECT public.note('format(text, name, name)'); SELECT pg_catalog.format(f, a, b) $$;
    CREATE FUNCTION public.jsonb_field(j jsonb, k jsonb) RETURNS text
      LANGUAGE sql AS $$ SELECT public.note('->>(jsonb, jsonb)'); SELECT j OPERATOR(pg_catalog.->>) (k #>> '{}') $$;
    CREATE OPERATOR public.->> (LEFTARG = jsonb, RIGHTARG = jsonb, FUNCTION = public.jsonb_field);
";

#[tokio::test(flavor = "multi_thread")]
async fn no_worker_command_calls_a_function_planted_in_public() {
    let pg = PgCluster::start().await;
    let db = pg.superuser().await;
    db.batch_execute(
        "CREATE ROLE mallory LOGIN;
         GRANT CREATE ON SCHEMA public TO mallory;
         GRANT USAGE ON SCHEMA outbox TO mallory;
         CREATE ROLE relay LOGIN REPLICATION IN ROLE outbox_relay;",
    )
    .await
    .unwrap();
    let mallory = pg.connect_as("mallory").await;
    mallory.batch_execute(SHADOWS).await.unwrap();
    // The shadows work: an unqualified call from a default search_path lands in them.
    let probe = pg.connect_as("relay").await;
    probe
        .batch_execute("SELECT quote_ident(current_user)")
        .await
        .unwrap();
    assert_eq!(
        count(&probe, "SELECT count(*) FROM public.hijacked").await,
        1,
        "the planted quote_ident(name) was not reached: the test proves nothing"
    );
    db.batch_execute("TRUNCATE public.hijacked").await.unwrap();

    let url = pg.url_of("relay", "postgres");
    let ok = |args: &[&str]| {
        let out = run_once(args, &[]);
        assert!(
            out.status.success(),
            "outbox-worker {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ok(&["setup", "--postgres-url", &url]);
    ok(&["setup", "--new-slot", "--postgres-url", &url]);
    let dir = tempfile::tempdir().unwrap();
    let stdout = dir.path().join("stdout");
    let mut worker = Worker::start(&["run", "--postgres-url", &url], Some(&stdout));
    pg.wait_for_slot(&db).await;
    publish_range(&db, "orders", 0, 20, 4, Storage::Mixed).await;
    eventually(Duration::from_secs(60), "20 messages delivered", || async {
        lines(&stdout) >= 20
    })
    .await;
    // A dead letter for dlq list and redrive.
    db.batch_execute(
        "INSERT INTO outbox.dead_letters (id, queue, key, headers, payload, created_at, destination, error, attempts)
         SELECT gen_random_uuid(), 'orders', 'k', '{}', '{\"dead\": 1}', now(), 'stdout', 'test', 1",
    )
    .await
    .unwrap();
    ok(&["status", "--postgres-url", &url]);
    ok(&["dlq", "list", "--postgres-url", &url]);
    ok(&[
        "dlq",
        "redrive",
        "--queue",
        "orders",
        "--postgres-url",
        &url,
    ]);
    ok(&["replay", "--since", "1h", "--postgres-url", &url]);
    eventually(
        Duration::from_secs(60),
        "the redriven message delivered",
        || async { lines(&stdout) >= 21 },
    )
    .await;
    worker.terminate(Duration::from_secs(30));

    let calls: Vec<String> = db
        .query("SELECT by || ' called ' || via FROM public.hijacked", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(calls.is_empty(), "planted functions ran: {calls:?}");
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}
