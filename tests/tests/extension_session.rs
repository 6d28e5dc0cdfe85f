//! Installing or upgrading pg_outbox leaves the caller's session as it was: the scripts pin their
//! own search_path, and only for themselves. 0.2.1 before this fix left `pg_catalog, pg_temp`
//! behind, so the next `CREATE TABLE orders` of a migration failed ("permission denied to create
//! pg_catalog.orders").

use outbox_tests::PgCluster;

async fn search_path(db: &tokio_postgres::Client) -> String {
    db.query_one("SHOW search_path", &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn create_and_alter_extension_leave_the_sessions_search_path_alone() {
    let pg = PgCluster::start_without_extension();
    let db = pg.superuser().await;
    db.batch_execute("CREATE SCHEMA app; SET search_path = app, public")
        .await
        .unwrap();
    for (step, sql) in [
        ("CREATE EXTENSION", "CREATE EXTENSION pg_outbox"),
        ("DROP EXTENSION", "DROP EXTENSION pg_outbox"),
        (
            "CREATE EXTENSION 0.1.0",
            "CREATE EXTENSION pg_outbox VERSION '0.1.0'",
        ),
        (
            "ALTER EXTENSION UPDATE (0.1.0 -> latest)",
            "ALTER EXTENSION pg_outbox UPDATE",
        ),
    ] {
        db.batch_execute(sql).await.unwrap();
        assert_eq!(search_path(&db).await, "app, public", "after {step}");
    }
    // A migration's next statement works as it did before.
    db.batch_execute("CREATE TABLE orders (id int)")
        .await
        .unwrap();
    let schema: String = db
        .query_one(
            "SELECT relnamespace::regnamespace::text FROM pg_class WHERE relname = 'orders'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(schema, "app");
}
