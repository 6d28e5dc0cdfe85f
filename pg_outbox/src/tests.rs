//! In-database tests (`cargo pgrx test`): each runs in one transaction that is rolled back.
//! Logical decoding, concurrency, commit/rollback and the error catalogue are tested against a
//! real cluster in `tests/` (see `tests/tests/extension_*.rs`).

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn count(sql: &str) -> i64 {
        Spi::get_one::<i64>(sql).unwrap().unwrap()
    }

    #[pg_test]
    fn publish_stores_a_row_with_a_uuidv7_id() {
        let id = Spi::get_one::<pgrx::Uuid>(
            "SELECT outbox.publish('orders', '{\"total\": 12.5}', '{\"traceparent\": \"00-ab\"}', 'customer-7')",
        )
        .unwrap()
        .unwrap();
        assert_eq!(id.as_bytes()[6] >> 4, 7, "version nibble of {id}");
        let row = Spi::get_three::<String, String, String>(&format!(
            "SELECT queue, key, payload->>'total' FROM outbox.messages WHERE id = '{id}'"
        ))
        .unwrap();
        assert_eq!(
            row,
            (
                Some("orders".into()),
                Some("customer-7".into()),
                Some("12.5".into())
            )
        );
        assert_eq!(
            Spi::get_one::<String>(&format!(
                "SELECT headers->>'traceparent' FROM outbox.messages WHERE id = '{id}'"
            ))
            .unwrap(),
            Some("00-ab".into())
        );
    }

    #[pg_test]
    fn ids_are_time_ordered_within_a_batch() {
        assert_eq!(
            count(
                "WITH ids AS (SELECT id, row_number() OVER () AS n
                                FROM outbox.publish_batch('q', ARRAY['1','2','3','4']::jsonb[], '{}', ARRAY['a',NULL,'c','d']) id)
                 SELECT count(*) FROM ids a JOIN ids b ON a.n < b.n WHERE a.id >= b.id"
            ),
            0
        );
        assert_eq!(
            count("SELECT count(*) FROM outbox.messages WHERE queue = 'q'"),
            4
        );
        assert_eq!(
            count("SELECT count(*) FROM outbox.messages WHERE queue = 'q' AND key IS NULL"),
            1
        );
    }

    /// The size cap's count of a jsonb's JSON text, read from the binary form, is exactly the
    /// length jsonb_out prints: numbers of every form, escapes, nesting, long containers (whose
    /// entries store offsets every 32nd element), raw scalars.
    #[pg_test]
    fn the_json_text_length_is_what_jsonb_out_prints() {
        let long_array = format!("[{}]", vec!["\"x\""; 100].join(","));
        let long_object = format!(
            "{{{}}}",
            (0..70)
                .map(|i| format!("\"k{i}\": [{i}, -{i}.5e-3]"))
                .collect::<Vec<_>>()
                .join(",")
        );
        let values = [
            "0",
            "1",
            "-1",
            "9",
            "10",
            "99",
            "100",
            "999",
            "1000",
            "9999",
            "10000",
            "12345",
            "-12345678.90",
            "0.000001",
            "0.1",
            "1e-10",
            "-0.5",
            "1.000",
            "1e131071",
            "-1e1000",
            "123456789012345678901234567890.123456789",
            "1e-16383",
            "true",
            "false",
            "null",
            r#""""#,
            r#""a\"b\\c\nd\re\tf\bg\fh\u0001i\u001fé€""#,
            "[]",
            "{}",
            r#"[[], {}, [1, [2, {"a": null}]], "x"]"#,
            r#"{"k": true, "": false, "x": "y", "nested": {"a": [1, 2.5, "3"]}}"#,
            &long_array,
            &long_object,
        ];
        for value in values {
            assert_text_is_jsonb_out(value);
        }
    }

    /// The wal envelope's JSON text, printed from the binary form, is byte for byte what
    /// jsonb_out prints, and as long as the size rule counts: 3,000 random values (numbers of
    /// every scale and exponent, escapes, unicode, nesting, containers past 32 entries).
    #[pg_test]
    fn printed_json_text_is_what_jsonb_out_prints() {
        let mut seed = 0x9E37_79B9_7F4A_7C15_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        fn value(next: &mut dyn FnMut(u64) -> u64, depth: u32) -> String {
            let pick = if depth > 3 { next(4) } else { next(7) };
            match pick {
                0 => {
                    let digits: String = (0..1 + next(40))
                        .map(|_| char::from(b'0' + next(10) as u8))
                        .collect();
                    let mut n = format!(
                        "{}{}",
                        if next(3) == 0 { "-" } else { "" },
                        digits.trim_start_matches('0')
                    );
                    if n.is_empty() || n == "-" {
                        n.push('0');
                    }
                    if next(2) == 0 {
                        n.push('.');
                        n.extend((0..1 + next(30)).map(|_| char::from(b'0' + next(10) as u8)));
                    }
                    if next(3) == 0 {
                        n.push_str(&format!(
                            "e{}{}",
                            if next(2) == 0 { "-" } else { "" },
                            next(400)
                        ));
                    }
                    n
                }
                1 => {
                    let chars = [
                        'a', 'é', '€', '😀', '"', '\\', '\n', '\u{1}', '\u{1f}', '\t', '/', ' ',
                    ];
                    let text: String = (0..next(20))
                        .map(|_| chars[next(chars.len() as u64) as usize])
                        .collect();
                    serde_json::to_string(&text).unwrap()
                }
                2 => ["true", "false", "null"][next(3) as usize].to_string(),
                3 => format!("{}", next(100_000) as i64 - 50_000),
                4 | 5 => {
                    let n = if next(4) == 0 { 30 + next(40) } else { next(5) };
                    let items: Vec<String> = (0..n).map(|_| value(next, depth + 1)).collect();
                    format!("[{}]", items.join(","))
                }
                _ => {
                    let n = if next(4) == 0 { 30 + next(40) } else { next(5) };
                    let items: Vec<String> = (0..n)
                        .map(|i| {
                            format!(
                                "\"k{}{}\": {}",
                                i,
                                "x".repeat(next(3) as usize),
                                value(next, depth + 1)
                            )
                        })
                        .collect();
                    format!("{{{}}}", items.join(", "))
                }
            }
        }
        for _ in 0..3000 {
            assert_text_is_jsonb_out(&value(&mut next, 0));
        }
    }

    /// The length the size rule counts and the text the wal form prints are jsonb_out's.
    fn assert_text_is_jsonb_out(value: &str) {
        let text = std::ffi::CString::new(value).unwrap();
        // SAFETY: jsonb_in with a NUL-terminated JSON text; the result is a jsonb datum.
        let json = unsafe {
            crate::jsonb::Jsonb::from_datum(
                pgrx::direct_function_call_as_datum(
                    pg_sys::jsonb_in,
                    &[Some(pg_sys::Datum::from(text.as_ptr()))],
                )
                .unwrap(),
            )
        };
        let expected = json.to_text();
        let mut printed = Vec::with_capacity(json.text_len() + 3);
        json.print_text(&mut printed);
        assert_eq!(std::str::from_utf8(&printed).unwrap(), expected, "{value}");
        assert_eq!(json.text_len(), expected.len(), "{value}");
    }

    /// A payload of a few kilobytes that prints as megabytes is measured as it prints.
    #[pg_test(
        error = "outbox.publish: the message is 3276852 bytes (key 0, headers 2, payload 3276850), more than pg_outbox.max_message_size (524288 bytes)"
    )]
    fn numbers_with_huge_exponents_count_at_their_printed_size() {
        Spi::run("SELECT outbox.publish('q', (SELECT jsonb_agg('1e131071'::numeric) FROM generate_series(1, 25)))").unwrap();
    }

    #[pg_test(
        error = "pg_outbox: a JSON null payload cannot be published with pg_outbox.storage = 'wal'"
    )]
    fn a_json_null_payload_is_refused_in_the_wal_form() {
        Spi::run("SET LOCAL pg_outbox.storage = 'wal'; SELECT outbox.publish('q', 'null')")
            .unwrap();
    }

    #[pg_test]
    fn a_json_null_payload_is_a_row_in_the_table_form() {
        Spi::run("SELECT outbox.publish('q', 'null')").unwrap();
        assert_eq!(
            count("SELECT count(*) FROM outbox.messages WHERE payload = 'null'"),
            1
        );
    }

    /// heap_insert skips the partition constraint an INSERT checks (SQLSTATE 23514): refused.
    #[pg_test(
        error = "outbox.publish: outbox.messages is a partition of another table, which publish cannot honour"
    )]
    fn publish_refuses_a_table_attached_as_a_partition() {
        Spi::run(
            "CREATE TABLE public.all_messages (LIKE outbox.messages) PARTITION BY RANGE (created_at);
             ALTER TABLE public.all_messages ATTACH PARTITION outbox.messages
                 FOR VALUES FROM ('2000-01-01') TO ('2000-01-02');
             SELECT outbox.publish('q', '{}')",
        )
        .unwrap();
    }

    /// A huge invalid queue name is reported from its first kilobyte, never copied whole.
    #[pg_test]
    fn a_huge_queue_name_is_refused_without_copying_it() {
        Spi::run(
            "CREATE FUNCTION pg_temp.refusal() RETURNS text LANGUAGE plpgsql AS $$
             BEGIN
                 PERFORM outbox.publish(repeat('q', 50000000), '{}');
                 RETURN 'published';
             EXCEPTION WHEN invalid_parameter_value THEN
                 RETURN SQLERRM;
             END $$",
        )
        .unwrap();
        let message = Spi::get_one::<String>("SELECT pg_temp.refusal()")
            .unwrap()
            .unwrap();
        assert!(
            message.ends_with("...\": it is 50000000 characters long, the limit is 249"),
            "{}",
            &message[message.len().saturating_sub(200)..]
        );
        assert!(message.len() < 1200, "{} bytes", message.len());
    }

    #[pg_test]
    fn null_headers_mean_no_headers() {
        Spi::run("SELECT outbox.publish('q', '1', NULL)").unwrap();
        assert_eq!(
            count("SELECT count(*) FROM outbox.messages WHERE headers = '{}'"),
            1
        );
    }

    #[pg_test]
    fn publish_bytes_stores_bytes_only() {
        Spi::run("SELECT outbox.publish_bytes('avro.orders', '\\x00ff'::bytea, '{\"content-type\": \"application/avro\"}')")
            .unwrap();
        assert_eq!(
            count("SELECT count(*) FROM outbox.messages WHERE payload IS NULL AND payload_bytes = '\\x00ff'::bytea"),
            1
        );
    }

    #[pg_test]
    fn wal_storage_writes_no_row() {
        Spi::run("SET LOCAL pg_outbox.storage = 'wal'").unwrap();
        Spi::run("SELECT outbox.publish('q', '{}')").unwrap();
        Spi::run("SELECT outbox.publish_batch('q', ARRAY['1','2']::jsonb[])").unwrap();
        assert_eq!(count("SELECT count(*) FROM outbox.messages"), 0);
    }

    #[pg_test(error = "invalid value for parameter \"pg_outbox.storage\": \"disk\"")]
    fn unknown_storage_mode_is_rejected() {
        Spi::run("SET pg_outbox.storage = 'disk'").unwrap();
    }

    #[pg_test]
    fn dedup_marks_once_per_consumer() {
        Spi::run("SELECT outbox.register_consumer(c, current_user::regrole) FROM unnest(ARRAY['billing', 'shipping']) c")
            .unwrap();
        assert_eq!(
            Spi::get_one::<bool>("SELECT outbox.try_mark_processed('billing', 'm1')").unwrap(),
            Some(true)
        );
        assert_eq!(
            Spi::get_one::<bool>("SELECT outbox.try_mark_processed('billing', 'm1')").unwrap(),
            Some(false)
        );
        assert_eq!(
            Spi::get_one::<bool>("SELECT outbox.try_mark_processed('shipping', 'm1')").unwrap(),
            Some(true)
        );
        assert_eq!(
            Spi::get_one::<bool>("SELECT outbox.is_processed('billing', 'm1')").unwrap(),
            Some(true)
        );
        assert_eq!(
            Spi::get_one::<bool>("SELECT outbox.is_processed('billing', 'm2')").unwrap(),
            Some(false)
        );
        Spi::run("UPDATE outbox.processed_messages SET processed_at = now() - interval '8 days' WHERE consumer = 'billing'")
            .unwrap();
        assert_eq!(
            count("SELECT outbox.purge_processed(interval '7 days', 'shipping')"),
            0
        );
        assert_eq!(count("SELECT outbox.purge_processed(interval '7 days')"), 1);
        assert_eq!(
            Spi::get_one::<bool>("SELECT outbox.is_processed('billing', 'm1')").unwrap(),
            Some(false)
        );
    }

    #[pg_test]
    fn redrive_publishes_again_with_the_same_id() {
        Spi::run(
            "INSERT INTO outbox.dead_letters (id, queue, key, payload, payload_bytes, headers, created_at, destination, error, attempts)
             VALUES ('018f0000-0000-7000-8000-000000000001', 'orders', 'k', '{\"n\": 1}', NULL, '{\"h\": \"v\"}', now(), 'kafka:orders', 'MSG_SIZE_TOO_LARGE', 5),
                    ('018f0000-0000-7000-8000-000000000002', 'orders', NULL, NULL, '\\x01', '{}', now(), 'kafka:orders', 'too large', 5),
                    ('018f0000-0000-7000-8000-000000000003', 'other', NULL, '2', NULL, '{}', now(), 'amqp:x', 'unroutable', 3)",
        )
        .unwrap();
        assert_eq!(
            Spi::get_one::<pgrx::Uuid>(
                "SELECT outbox.redrive('018f0000-0000-7000-8000-000000000003'::uuid)"
            )
            .unwrap()
            .map(|u| u.to_string()),
            Some("018f0000-0000-7000-8000-000000000003".into())
        );
        assert_eq!(count("SELECT outbox.redrive('orders')"), 2);
        assert_eq!(count("SELECT count(*) FROM outbox.dead_letters"), 0);
        assert_eq!(
            count(
                "SELECT count(*) FROM outbox.messages WHERE id IN ('018f0000-0000-7000-8000-000000000001',
                 '018f0000-0000-7000-8000-000000000002', '018f0000-0000-7000-8000-000000000003')"
            ),
            3
        );
        assert_eq!(
            Spi::get_one::<String>(
                "SELECT headers->>'h' FROM outbox.messages WHERE id = '018f0000-0000-7000-8000-000000000001' AND key = 'k'"
            )
            .unwrap(),
            Some("v".into())
        );
    }

    #[pg_test(
        error = "outbox.redrive: no dead letter with id 018f0000-0000-7000-8000-00000000000f"
    )]
    fn redrive_of_an_unknown_id_fails() {
        Spi::run("SELECT outbox.redrive('018f0000-0000-7000-8000-00000000000f'::uuid)").unwrap();
    }

    #[pg_test]
    fn prune_deletes_only_expired_rows_in_batches() {
        Spi::run("SELECT outbox.publish_batch('q', array_agg(to_jsonb(g))) FROM generate_series(1, 25) g").unwrap();
        Spi::run("UPDATE outbox.messages SET created_at = now() - interval '2 days' WHERE (payload::int) <= 20").unwrap();
        assert_eq!(count("SELECT outbox.prune(max_rows => 15)"), 15);
        assert_eq!(count("SELECT outbox.prune(max_rows => 15)"), 5);
        assert_eq!(count("SELECT outbox.prune()"), 0);
        assert_eq!(count("SELECT count(*) FROM outbox.messages"), 5);
    }

    #[pg_test]
    fn retention_setting_drives_prune() {
        Spi::run("SELECT outbox.publish('q', '1')").unwrap();
        Spi::run("UPDATE outbox.messages SET created_at = now() - interval '2 hours'").unwrap();
        assert_eq!(
            count("SELECT outbox.prune()"),
            0,
            "default retention is 1 day"
        );
        Spi::run("SET LOCAL pg_outbox.retention = '1h'").unwrap();
        assert_eq!(count("SELECT outbox.prune()"), 1);
    }

    #[pg_test]
    fn status_reports_the_slot() {
        // Read-only SPI: a slot cannot be created once the transaction has written.
        Spi::connect(|c| {
            c.select(
                "SELECT pg_create_logical_replication_slot('status_probe', 'pgoutput')",
                None,
                &[],
            )
            .map(|_| ())
        })
        .unwrap();
        let (active, lag) = Spi::get_two::<bool, AnyNumeric>(
            "SELECT active, lag_bytes FROM outbox.status() WHERE slot_name = 'status_probe'",
        )
        .unwrap();
        assert_eq!(active, Some(false));
        assert!(lag.is_some());
    }

    #[pg_test]
    fn a_publisher_role_can_publish_but_not_write_the_table() {
        Spi::run("CREATE ROLE app_writer LOGIN IN ROLE outbox_publisher").unwrap();
        Spi::run("CREATE ROLE stranger LOGIN").unwrap();
        Spi::run("SET LOCAL ROLE app_writer").unwrap();
        Spi::run("SELECT outbox.publish('orders', '{}')").unwrap();
        Spi::run("SELECT outbox.publish_batch('orders', ARRAY['1']::jsonb[])").unwrap();
        Spi::run("RESET ROLE").unwrap();
        assert_eq!(count("SELECT count(*) FROM outbox.messages"), 2);
    }

    #[pg_test(error = "permission denied for table messages")]
    fn a_publisher_role_cannot_insert_directly() {
        Spi::run("CREATE ROLE app_writer2 LOGIN IN ROLE outbox_publisher").unwrap();
        Spi::run("SET LOCAL ROLE app_writer2").unwrap();
        Spi::run("INSERT INTO outbox.messages (id, queue) VALUES (gen_random_uuid(), 'x')")
            .unwrap();
    }

    #[pg_test(error = "permission denied for function publish")]
    fn a_role_without_the_grant_cannot_publish() {
        Spi::run("CREATE ROLE stranger2 LOGIN").unwrap();
        Spi::run("GRANT USAGE ON SCHEMA outbox TO stranger2").unwrap();
        Spi::run("SET LOCAL ROLE stranger2").unwrap();
        Spi::run("SELECT outbox.publish('orders', '{}')").unwrap();
    }

    #[pg_test]
    fn publish_maintains_plain_indexes() {
        // Tests run concurrently: take the table first so index DDL cannot deadlock with them.
        Spi::run("LOCK TABLE outbox.messages IN SHARE ROW EXCLUSIVE MODE").unwrap();
        Spi::run("CREATE INDEX messages_key ON outbox.messages (key)").unwrap();
        Spi::run("SELECT outbox.publish_batch('q', array_agg(to_jsonb(g)), '{}', array_agg('k' || g)) FROM generate_series(1, 500) g")
            .unwrap();
        Spi::run("SET LOCAL enable_seqscan = off").unwrap();
        Spi::run("SET LOCAL enable_bitmapscan = off").unwrap();
        assert_eq!(
            count("SELECT count(*) FROM outbox.messages WHERE key = 'k42'"),
            1
        );
        let plan =
            Spi::get_one::<String>("EXPLAIN SELECT * FROM outbox.messages WHERE key = 'k42'")
                .unwrap()
                .unwrap();
        assert!(plan.contains("Index Scan using messages_key"), "{plan}");
    }

    #[pg_test(
        error = "outbox.publish: index messages_lower_key on outbox.messages uses an expression or a predicate, which publish cannot maintain"
    )]
    fn publish_refuses_expression_indexes() {
        // Tests run concurrently: take the table first so index DDL cannot deadlock with them.
        Spi::run("LOCK TABLE outbox.messages IN SHARE ROW EXCLUSIVE MODE").unwrap();
        Spi::run("CREATE INDEX messages_lower_key ON outbox.messages (lower(key))").unwrap();
        Spi::run("SELECT outbox.publish('q', '1')").unwrap();
    }
}
