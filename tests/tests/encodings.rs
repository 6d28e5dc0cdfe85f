//! Databases whose encoding is not UTF-8 (issue 30, item 1). The worker receives every text in
//! UTF-8: pgoutput converts the table form's, the extension converts the wal form's. 0.2.1's table
//! form accepted text UTF-8 cannot represent (a SQL_ASCII byte that is not UTF-8, WIN1252's 0x81):
//! the walsender then failed on that row at every reconnect and nothing after it was ever
//! delivered. And its size rule counted the database's bytes, not those sent (a LATIN1 `é` is sent
//! as 2). Now such text is refused at publish in both forms and both installs, the size rule counts
//! what is sent, and what can be sent arrives as the right UTF-8.

use std::time::Duration;

use outbox_tests::postgres::{expect_error, Install};
use outbox_tests::publish::stdout_file;
use outbox_tests::{eventually, on_both_installs, PgCluster, Worker};

/// (database encoding, an SQL expression for text in it that UTF-8 cannot represent).
const ENCODINGS: [(&str, Option<&str>); 3] = [
    (
        "SQL_ASCII",
        Some("convert_from('\\xe9'::bytea, 'SQL_ASCII')"),
    ),
    ("LATIN1", None),
    ("WIN1252", Some("convert_from('\\x81'::bytea, 'WIN1252')")),
];

async fn text_utf8_cannot_carry_is_refused_and_delivery_goes_on(install: Install) {
    let pg = PgCluster::start_without_extension();
    let admin = pg.superuser().await;
    let forms: &[&str] = match install {
        Install::Extension => &["table", "wal"],
        // The SQL install writes the table form only.
        Install::Sql => &["table"],
    };
    let mut workers = Vec::new();
    for (encoding, unconvertible) in ENCODINGS {
        let database = format!("db_{}", encoding.to_lowercase());
        admin
            .batch_execute(&format!(
                "CREATE DATABASE {database} ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C' \
                 TEMPLATE template0"
            ))
            .await
            .unwrap();
        pg.install_in(install, &database).await;
        let (dir, out) = stdout_file();
        let slot = format!("slot_{}", encoding.to_lowercase());
        let url = pg.url_of("postgres", &database);
        let worker = Worker::start(
            &["run", "--postgres-url", &url, "--slot", &slot],
            Some(&out),
        );
        let db = pg.connect_to("postgres", &database).await;
        let (db_ref, slot_ref) = (&db, &slot);
        eventually(
            Duration::from_secs(30),
            "the worker's slot",
            || async move {
                db_ref
                    .query_one(
                        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1 AND active",
                        &[slot_ref],
                    )
                    .await
                    .unwrap()
                    .get::<_, i64>(0)
                    == 1
            },
        )
        .await;
        // The size limit at 1kB: by install, as each sets it.
        match install {
            Install::Extension => db
                .batch_execute("SET pg_outbox.max_message_size = '1kB'")
                .await
                .unwrap(),
            Install::Sql => pg
                .connect_to("installer", &database)
                .await
                .batch_execute("SELECT outbox.set_setting('pg_outbox.max_message_size', '1kB')")
                .await
                .unwrap(),
        }

        let publish = |form: &str, payload: &str, headers: &str, key: &str| {
            format!(
                "BEGIN; SET LOCAL pg_outbox.storage = '{form}';
                 SELECT outbox.publish('q', {payload}, {headers}, {key});
                 COMMIT;"
            )
        };
        // What every encoding can send: é in payload, header and key.
        for form in forms {
            db.batch_execute(&publish(
                form,
                &format!("jsonb_build_object('text', 'é', 'form', '{form}')"),
                "jsonb_build_object('h', 'é')",
                "'é'",
            ))
            .await
            .unwrap();
        }
        // What UTF-8 cannot carry: refused, wherever it is, in every form.
        if let Some(bad) = unconvertible {
            for form in forms {
                for (payload, headers, key) in [
                    (
                        format!("jsonb_build_object('t', {bad})"),
                        "'{}'".into(),
                        "'k'".into(),
                    ),
                    (
                        "'{}'".into(),
                        format!("jsonb_build_object('h', {bad})"),
                        "'k'".into(),
                    ),
                    ("'{}'".into(), "'{}'".into(), bad.to_owned()),
                ] {
                    let sql = publish(form, &payload, &headers, &key);
                    let (code, message, hint) = expect_error(&db, &sql).await;
                    assert_eq!(code, "22021", "{encoding} {form}: {sql}: {message}");
                    assert!(
                        message.contains("cannot be converted to UTF-8"),
                        "{message}"
                    );
                    assert!(hint.contains("UTF-8"), "{hint}");
                    db.batch_execute("ROLLBACK").await.unwrap();
                }
            }
        }
        // The size rule counts what is sent: 600 é are 600 bytes here (in SQL_ASCII, 1,200: two
        // bytes each, as in UTF-8) and 1,200 sent, over 1kB.
        for form in forms {
            let sql = publish(
                form,
                "jsonb_build_object('t', repeat('é', 600))",
                "'{}'",
                "'k'",
            );
            let (code, message, _) = expect_error(&db, &sql).await;
            assert_eq!(code, "54000", "{encoding} {form}: {message}");
            assert!(
                message.contains("payload 1209"),
                "{encoding} {form}: {message}"
            );
            db.batch_execute("ROLLBACK").await.unwrap();
        }
        // Delivery goes on after every refusal.
        db.batch_execute(&publish(
            "table",
            "jsonb_build_object('after', 'é')",
            "'{}'",
            "'é'",
        ))
        .await
        .unwrap();
        workers.push((encoding, worker, dir, out, forms.len() + 1));
    }
    for (encoding, worker, _dir, out, expected) in &workers {
        let out = out.clone();
        let read = move || -> Vec<serde_json::Value> {
            std::fs::read_to_string(&out)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        };
        let lines = {
            let read = read.clone();
            eventually(
                Duration::from_secs(60),
                &format!("{expected} messages from the {encoding} database"),
                || {
                    let n = read().len();
                    async move { n >= *expected }
                },
            )
            .await;
            read()
        };
        assert_eq!(
            lines.len(),
            *expected,
            "{encoding}: {lines:?}\n{}",
            worker.log()
        );
        for line in &lines[..expected - 1] {
            assert_eq!(line["payload"]["text"], "é", "{encoding}: {line}");
            assert_eq!(line["headers"]["h"], "é", "{encoding}: {line}");
            assert_eq!(line["key"], "é", "{encoding}: {line}");
        }
        assert_eq!(lines[expected - 1]["payload"]["after"], "é", "{encoding}");
    }
}

on_both_installs!(text_utf8_cannot_carry_is_refused_and_delivery_goes_on);
