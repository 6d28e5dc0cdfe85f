//! `ALTER EXTENSION pg_outbox UPDATE` from every released version: old rows intact, everything
//! works afterwards, and the upgraded schema is exactly a fresh install's.

use outbox_tests::postgres::{column, count};
use outbox_tests::PgCluster;
use tokio_postgres::Client;

/// What makes two installs the same: every object of schema outbox with its definition, rights
/// and comment, the extension's members and dumped tables, policies, the publication.
const FINGERPRINT: &str = r#"
SELECT string_agg(line, E'\n' ORDER BY line) FROM (
  SELECT format('function %s secdef=%s volatile=%s parallel=%s strict=%s config=%s acl=%s body=%s comment=%s',
                p.oid::regprocedure, p.prosecdef, p.provolatile, p.proparallel, p.proisstrict, p.proconfig,
                (SELECT array_agg(a::text ORDER BY a::text) FROM unnest(p.proacl) a), md5(coalesce(pg_get_function_sqlbody(p.oid), p.prosrc)), obj_description(p.oid, 'pg_proc'))
    FROM pg_proc p WHERE p.pronamespace = 'outbox'::regnamespace
  UNION ALL
  SELECT format('column %s.%s %s notnull=%s default=%s', c.relname, a.attname,
                format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(d.adbin, d.adrelid))
    FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
   WHERE c.relnamespace = 'outbox'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
  UNION ALL
  SELECT format('relation %s kind=%s acl=%s rls=%s replident=%s comment=%s', c.relname, c.relkind,
                (SELECT array_agg(a::text ORDER BY a::text) FROM unnest(c.relacl) a), c.relrowsecurity, c.relreplident, obj_description(c.oid, 'pg_class'))
    FROM pg_class c WHERE c.relnamespace = 'outbox'::regnamespace
  UNION ALL
  SELECT format('trigger %s', pg_get_triggerdef(t.oid))
    FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
   WHERE c.relnamespace = 'outbox'::regnamespace AND NOT t.tgisinternal
  UNION ALL
  SELECT format('index %s', pg_get_indexdef(i.indexrelid))
    FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid WHERE c.relnamespace = 'outbox'::regnamespace
  UNION ALL
  SELECT format('constraint %s %s', c.conname, pg_get_constraintdef(c.oid))
    FROM pg_constraint c WHERE c.connamespace = 'outbox'::regnamespace
  UNION ALL
  SELECT format('policy %s on %s cmd=%s roles=%s using=%s check=%s', p.polname, p.polrelid::regclass,
                p.polcmd, p.polroles::regrole[], pg_get_expr(p.polqual, p.polrelid),
                pg_get_expr(p.polwithcheck, p.polrelid))
    FROM pg_policy p
  UNION ALL
  SELECT format('member %s', pg_describe_object(d.classid, d.objid, d.objsubid))
    FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
   WHERE e.extname = 'pg_outbox' AND d.deptype = 'e'
  UNION ALL
  SELECT format('dumped %s', (SELECT array_agg(t::regclass::text ORDER BY t::regclass::text) FROM unnest(e.extconfig) t))
    FROM pg_extension e WHERE e.extname = 'pg_outbox'
  UNION ALL
  SELECT format('publication %s insert=%s update=%s delete=%s tables=%s', p.pubname, p.pubinsert,
                p.pubupdate, p.pubdelete,
                (SELECT array_agg(t.tablename ORDER BY t.tablename) FROM pg_publication_tables t WHERE t.pubname = p.pubname))
    FROM pg_publication p
  UNION ALL
  SELECT format('emit_message %s acl=%s', p.oid::regprocedure, p.proacl)
    FROM pg_proc p WHERE p.proname = 'pg_logical_emit_message'
) objects(line)
"#;

async fn fingerprint(db: &Client) -> String {
    db.query_one(FINGERPRINT, &[]).await.unwrap().get(0)
}

/// A cluster without the extension, with these databases.
async fn with_databases(databases: &[&str]) -> PgCluster {
    let pg = PgCluster::start_without_extension();
    let admin = pg.superuser().await;
    for database in databases {
        admin
            .batch_execute(&format!("CREATE DATABASE {database}"))
            .await
            .unwrap();
    }
    pg
}

#[tokio::test(flavor = "multi_thread")]
async fn upgrade_from_0_1_0_keeps_rows_and_equals_a_fresh_install() {
    let pg = with_databases(&["upgraded", "fresh"]).await;
    let fresh = pg.connect_to("postgres", "fresh").await;
    fresh
        .batch_execute("CREATE EXTENSION pg_outbox")
        .await
        .unwrap();
    let current: String = fresh
        .query_one(
            "SELECT extversion FROM pg_extension WHERE extname = 'pg_outbox'",
            &[],
        )
        .await
        .unwrap()
        .get(0);

    let db = pg.connect_to("postgres", "upgraded").await;
    db.batch_execute("SELECT pg_create_logical_replication_slot('probe', 'test_decoding')")
        .await
        .unwrap();
    db.batch_execute(
        "CREATE EXTENSION pg_outbox VERSION '0.1.0';
         SELECT outbox.publish('orders', '{\"n\": 1}', '{}', 'old-table');
         BEGIN; SET LOCAL pg_outbox.storage = 'wal'; SELECT outbox.publish('orders', '{\"n\": 2}', '{}', 'old-wal'); COMMIT;
         SELECT outbox.try_mark_processed('billing', 'm-1');
         INSERT INTO outbox.dead_letters (id, queue, payload, created_at, destination, error, attempts)
              VALUES ('018f0000-0000-7000-8000-000000000001', 'orders', '{}', now(), 'kafka:orders', 'too large', 5);",
    )
    .await
    .unwrap();

    // Through psql, to see what an administrator sees: the warning that 0.1.0's consumer names
    // stay open to every member of outbox_consumer (a NOTICE there would be hidden).
    let out = std::process::Command::new(outbox_tests::postgres::program("psql"))
        .args([
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            "ALTER EXTENSION pg_outbox UPDATE",
        ])
        .arg(pg.url_of("postgres", "upgraded"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("WARNING:  pg_outbox 0.2.0: consumers {billing} are registered for every member of outbox_consumer"),
        "{stderr}"
    );
    let version: String = db
        .query_one(
            "SELECT extversion FROM pg_extension WHERE extname = 'pg_outbox'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, current);
    assert_eq!(fingerprint(&db).await, fingerprint(&fresh).await);

    // Old rows intact.
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox.messages WHERE key = 'old-table'"
        )
        .await,
        1
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox.dead_letters").await,
        1
    );
    // The old mark still de-duplicates (0.1.0's consumer names stay usable by outbox_consumer).
    let again: bool = db
        .query_one("SELECT outbox.try_mark_processed('billing', 'm-1')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!again);
    // Publish in both forms, decode, prune.
    db.batch_execute(
        "SELECT outbox.publish('orders', '{\"n\": 3}', '{}', 'new-table');
         BEGIN; SET LOCAL pg_outbox.storage = 'wal'; SELECT outbox.publish('orders', '{\"n\": 4}', '{}', 'new-wal'); COMMIT;",
    )
    .await
    .unwrap();
    let changes: String = db
        .query_one(
            "SELECT string_agg(data, E'\\n') FROM pg_logical_slot_get_changes('probe', NULL, NULL)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    for key in ["old-table", "old-wal", "new-table", "new-wal"] {
        assert!(changes.contains(key), "{key} not decoded:\n{changes}");
    }
    db.batch_execute("UPDATE outbox.messages SET created_at = now() - interval '2 days'")
        .await
        .unwrap();
    assert_eq!(count(&db, "SELECT outbox.prune()").await, 2);
}

/// 0.2.0 -> 0.2.1 (issue 21): the rights, the row-level security function and the publication
/// made again, with the installer's default privileges revoked, equal to a fresh install.
#[tokio::test(flavor = "multi_thread")]
async fn upgrade_from_0_2_0_equals_a_fresh_install_and_revokes_what_default_privileges_granted() {
    let pg = with_databases(&["upgraded", "fresh"]).await;
    let fresh = pg.connect_to("postgres", "fresh").await;
    fresh
        .batch_execute("CREATE EXTENSION pg_outbox")
        .await
        .unwrap();
    let db = pg.connect_to("postgres", "upgraded").await;
    db.batch_execute(
        "CREATE ROLE app LOGIN;
         ALTER DEFAULT PRIVILEGES GRANT ALL ON TABLES TO app;
         ALTER DEFAULT PRIVILEGES GRANT ALL ON FUNCTIONS TO app;
         CREATE EXTENSION pg_outbox VERSION '0.2.0';
         ALTER DEFAULT PRIVILEGES REVOKE ALL ON TABLES FROM app;
         ALTER DEFAULT PRIVILEGES REVOKE ALL ON FUNCTIONS FROM app;
         SELECT outbox.publish('orders', '{\"n\": 1}', '{}', 'old');
         INSERT INTO outbox.dead_letters (id, queue, payload, created_at, destination, error, attempts)
              VALUES ('018f0000-0000-7000-8000-000000000001', 'orders', '{}', now(), 'kafka:orders', 'too large', 5);",
    )
    .await
    .unwrap();
    assert!(
        count(
            &db,
            "SELECT count(*) FROM pg_class c, aclexplode(c.relacl) g
              WHERE c.relnamespace = 'outbox'::regnamespace AND g.grantee = 'app'::regrole"
        )
        .await
            > 0,
        "0.2.0 let default privileges grant app rights on outbox.*"
    );
    db.batch_execute("ALTER EXTENSION pg_outbox UPDATE")
        .await
        .unwrap();
    assert_eq!(fingerprint(&db).await, fingerprint(&fresh).await);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox.messages WHERE key = 'old'"
        )
        .await,
        1
    );
    // Dead letters name who wrote them from 0.2.1 on; one written before names nobody.
    db.batch_execute(
        "INSERT INTO outbox.dead_letters (id, queue, payload, created_at, destination, error, attempts)
              VALUES ('018f0000-0000-7000-8000-000000000002', 'orders', '{}', now(), 'kafka:orders', 'too large', 5);",
    )
    .await
    .unwrap();
    let writers: Vec<Option<String>> = column(
        &db,
        "SELECT written_by::text FROM outbox.dead_letters ORDER BY id",
    )
    .await;
    assert_eq!(writers, [None, Some("postgres".to_owned())]);
}

/// 0.2.1 -> 0.2.2 (issue 30): api.sql replayed (functions replaced in place, policies kept), the
/// dead-letter trigger made ALWAYS; equal to a fresh install, rows and marks kept.
#[tokio::test(flavor = "multi_thread")]
async fn upgrade_from_0_2_1_equals_a_fresh_install() {
    let pg = with_databases(&["upgraded", "fresh"]).await;
    // Upgraded first: outbox_relay, cluster-wide, does not exist yet (as in a cluster on 0.2.1).
    let db = pg.connect_to("postgres", "upgraded").await;
    db.batch_execute(
        "CREATE EXTENSION pg_outbox VERSION '0.2.1';
         CREATE ROLE app LOGIN IN ROLE outbox_consumer;
         CREATE ROLE worker LOGIN IN ROLE outbox_operator;
         SELECT outbox.publish('orders', '{\"n\": 1}', '{}', 'old');
         SELECT outbox.register_consumer('billing', 'app');",
    )
    .await
    .unwrap();
    assert_eq!(
        column::<String>(
            &db,
            "SELECT tgenabled::text FROM pg_trigger WHERE tgname = 'written_by'"
        )
        .await,
        ["O"],
        "0.2.1's trigger does not fire under session_replication_role = replica"
    );
    db.batch_execute("ALTER EXTENSION pg_outbox UPDATE")
        .await
        .unwrap();
    // 0.2.1's operators (its workers among them) wrote dead letters: they keep that right.
    assert_eq!(
        column::<bool>(
            &db,
            "SELECT pg_has_role('worker', 'outbox_relay', 'MEMBER')
                AND has_table_privilege('worker', 'outbox.dead_letters', 'INSERT')"
        )
        .await,
        [true]
    );
    let fresh = pg.connect_to("postgres", "fresh").await;
    fresh
        .batch_execute("CREATE EXTENSION pg_outbox")
        .await
        .unwrap();
    assert_eq!(fingerprint(&db).await, fingerprint(&fresh).await);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox.messages WHERE key = 'old'"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox.consumers WHERE role = 'app'"
        )
        .await,
        1
    );
}

/// Several databases of one cluster upgraded from 0.2.1 (hostile review): roles are cluster-wide
/// but the upgrade's lock is per database. Two at once both made outbox_relay (the second failed,
/// 23505); and only the first granted it to the operators, so a worker set up the 0.2.1 way for
/// the second database lost its dead letters there. Each database's upgrade now grants it to the
/// operators that lack it, and a role made meanwhile by another is taken as it is.
#[tokio::test(flavor = "multi_thread")]
async fn databases_of_one_cluster_upgrade_at_once_and_each_keeps_its_workers() {
    let pg = PgCluster::start_without_extension();
    let admin = pg.superuser().await;
    for database in ["a", "b"] {
        admin
            .batch_execute(&format!("CREATE DATABASE {database}"))
            .await
            .unwrap();
        pg.connect_to("postgres", database)
            .await
            .batch_execute("CREATE EXTENSION pg_outbox VERSION '0.2.1'")
            .await
            .unwrap();
    }
    let a = pg.connect_to("postgres", "a").await;
    let b = pg.connect_to("postgres", "b").await;
    // a's upgrade has made outbox_relay, not yet committed, when b's starts.
    a.batch_execute("BEGIN; ALTER EXTENSION pg_outbox UPDATE")
        .await
        .unwrap();
    let b_upgrade = tokio::spawn(async move {
        let result = b.batch_execute("ALTER EXTENSION pg_outbox UPDATE").await;
        (b, result)
    });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    a.batch_execute("COMMIT").await.unwrap();
    let (_b, result) = b_upgrade.await.unwrap();
    result.expect("the second database's upgrade");
    // c on 0.2.1 still; a worker for it set up the 0.2.1 way, after a's upgrade.
    admin.batch_execute("CREATE DATABASE c").await.unwrap();
    admin
        .batch_execute("CREATE ROLE w2 LOGIN IN ROLE outbox_operator")
        .await
        .unwrap();
    let c = pg.connect_to("postgres", "c").await;
    c.batch_execute(
        "CREATE EXTENSION pg_outbox VERSION '0.2.1';
         ALTER EXTENSION pg_outbox UPDATE;",
    )
    .await
    .unwrap();
    assert_eq!(
        column::<bool>(
            &c,
            "SELECT has_table_privilege('w2', 'outbox.dead_letters', 'INSERT')"
        )
        .await,
        [true]
    );
}
