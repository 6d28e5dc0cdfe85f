//! Both installs attacked by roles that hold no superuser: a consumer that plants its own `=`
//! operator, a role with CREATE on `public` or on the database that plants functions or
//! pre-creates schema `outbox`, its version record or the publication, default privileges of the
//! installer, payloads whose JSON text is far larger than their binary form (issue 21). And the
//! rule that prevents the class: every function of both installs resolves names the same under
//! any search_path, checked from `pg_proc`.

use outbox_tests::postgres::{column, count, expect_error, Install};
use outbox_tests::{on_both_installs, PgCluster};
use tokio_postgres::Client;

on_both_installs!(
    a_consumer_cannot_act_as_another_through_its_own_operator,
    every_function_means_the_same_under_any_search_path,
    default_privileges_of_the_installer_grant_nothing,
    a_publication_another_role_owns_is_refused,
    the_size_cap_counts_what_is_sent,
);

/// What the hostile consumer plants: an `=` for text that is always true, first in its path.
const SHADOW_EQUALS: &str = "
    CREATE FUNCTION evil.always(text, text) RETURNS boolean LANGUAGE sql IMMUTABLE AS 'SELECT true';
    CREATE OPERATOR evil.= (leftarg = text, rightarg = text, function = evil.always);
    CREATE OPERATOR evil.<> (leftarg = text, rightarg = text, function = evil.always);
    SET search_path = evil, pg_catalog;";

async fn a_consumer_cannot_act_as_another_through_its_own_operator(install: Install) {
    let pg = PgCluster::start_install(install).await;
    let admin = pg.superuser().await;
    admin
        .batch_execute(
            "CREATE ROLE billing_svc LOGIN IN ROLE outbox_consumer;
             CREATE ROLE shipping_svc LOGIN IN ROLE outbox_consumer;
             CREATE SCHEMA evil AUTHORIZATION billing_svc;
             CREATE ROLE ops LOGIN IN ROLE outbox_operator;",
        )
        .await
        .unwrap();
    pg.connect_as("ops")
        .await
        .batch_execute(
            "SELECT outbox.register_consumer('billing', 'billing_svc');
             SELECT outbox.register_consumer('shipping', 'shipping_svc');",
        )
        .await
        .unwrap();
    let shipping = pg.connect_as("shipping_svc").await;
    shipping
        .batch_execute("SELECT outbox.try_mark_processed('shipping', 'm-1')")
        .await
        .unwrap();
    let billing = pg.connect_as("billing_svc").await;
    billing.batch_execute(SHADOW_EQUALS).await.unwrap();
    // Reading, marking, deleting, asking: nothing of shipping's, by any route.
    assert_eq!(
        count(&billing, "SELECT count(*) FROM outbox.processed_messages").await,
        0
    );
    let may: bool = billing
        .query_one("SELECT outbox._may_act_as('shipping')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!may);
    for sql in [
        "INSERT INTO outbox.processed_messages (consumer, message_id) VALUES ('shipping', 'm-2')",
        "SELECT outbox.try_mark_processed('shipping', 'm-2')",
        "SELECT outbox.is_processed('shipping', 'm-1')",
    ] {
        let (code, message, _) = expect_error(&billing, sql).await;
        assert_eq!(code, "42501", "{sql}: {message}");
    }
    assert_eq!(
        count(
            &billing,
            "WITH gone AS (DELETE FROM outbox.processed_messages RETURNING 1) SELECT count(*) FROM gone"
        )
        .await,
        0
    );
    assert_eq!(
        count(&billing, "SELECT outbox.purge_processed('0 s', 'shipping')").await,
        0
    );
    // billing's own consumer still works under its search_path.
    let first: bool = billing
        .query_one("SELECT outbox.try_mark_processed('billing', 'm-1')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(first);
    // shipping's mark is intact, and nothing was marked in its name.
    let again: bool = shipping
        .query_one("SELECT outbox.try_mark_processed('shipping', 'm-1')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!again, "shipping's mark is gone");
    assert_eq!(
        count(
            &admin,
            "SELECT count(*) FROM outbox.processed_messages WHERE consumer = 'shipping'"
        )
        .await,
        1
    );
}

/// The rule of DEVELOPMENT.md ("SQL rules"), checked on every function of the install: it pins
/// `search_path = pg_catalog, pg_temp`, or has a SQL-standard body (parsed at install, names
/// bound then), or is C (which resolves no name through the search path), or its body passes
/// [`unqualified_names`].
async fn every_function_means_the_same_under_any_search_path(install: Install) {
    let pg = PgCluster::start_install(install).await;
    let db = pg.superuser().await;
    let rows = db
        .query(
            "SELECT p.oid::regprocedure::text, l.lanname, p.prosrc,
                    coalesce(p.proconfig, '{}') @> '{\"search_path=pg_catalog, pg_temp\"}' AS pinned,
                    p.prosqlbody IS NOT NULL AS atomic
               FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
              WHERE p.pronamespace = 'outbox'::regnamespace ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    assert!(rows.len() > 15, "{} functions", rows.len());
    let mut checked_by_body = Vec::new();
    for row in rows {
        let (name, language, body, pinned, atomic): (String, String, String, bool, bool) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        if pinned || atomic || language == "c" {
            continue;
        }
        assert_eq!(
            language, "plpgsql",
            "{name}: pin its search_path or give it a SQL-standard body (BEGIN ATOMIC)"
        );
        let problems = unqualified_names(&body);
        assert!(
            problems.is_empty(),
            "{name} has no SET search_path, and resolves names through the caller's: {problems:?}"
        );
        checked_by_body.push(name);
    }
    if install == Install::Sql {
        // The one function on the publish path that pays for no SET clause.
        assert_eq!(
            checked_by_body,
            ["outbox._publish(text,text,jsonb,bytea,jsonb,text,uuid,boolean)"]
        );
    }
    // Every policy calls only functions of the above.
    let policies: Vec<String> = column(
        &db,
        "SELECT coalesce(pg_get_expr(polqual, polrelid), '') || ' ' || coalesce(pg_get_expr(polwithcheck, polrelid), '')
           FROM pg_policy WHERE polrelid = 'outbox.processed_messages'::regclass",
    )
    .await;
    for policy in policies {
        let policy = policy.trim();
        assert!(
            policy.is_empty()
                || policy == "true"
                || policy.contains("outbox._may_act_as(consumer)"),
            "{policy}"
        );
    }
}

/// Names in a PL/pgSQL body that the caller's search_path could resolve: unqualified function
/// calls, operators not written `OPERATOR(pg_catalog.op)`, casts and variable types outside
/// pg_catalog, and constructs that look an operator up by name (IN, BETWEEN, LIKE, NULLIF,
/// IS DISTINCT FROM, a simple CASE).
fn unqualified_names(body: &str) -> Vec<String> {
    #[derive(Debug, PartialEq)]
    enum Token {
        Word(String),
        Symbol(String),
    }
    let mut tokens = Vec::new();
    let chars: Vec<char> = body.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '-' && chars.get(i + 1) == Some(&'-') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '\'' {
            // A string literal ('' inside), dropped.
            i += 1;
            while i < chars.len() {
                if chars[i] == '\'' && chars.get(i + 1) == Some(&'\'') {
                    i += 2;
                } else if chars[i] == '\'' {
                    break;
                } else {
                    i += 1;
                }
            }
            i += 1;
            tokens.push(Token::Word("'literal'".into()));
        } else if c.is_alphanumeric() || c == '_' || c == '"' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_alphanumeric() || matches!(chars[i], '_' | '$' | '"'))
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            tokens.push(Token::Word(word.to_lowercase()));
        } else if "+-*/<>=~!@#%^&|?:".contains(c) {
            let start = i;
            while i < chars.len() && "+-*/<>=~!@#%^&|?:".contains(chars[i]) {
                i += 1;
            }
            tokens.push(Token::Symbol(chars[start..i].iter().collect()));
        } else {
            tokens.push(Token::Symbol(c.to_string()));
            i += 1;
        }
    }
    let word = |t: Option<&Token>, w: &str| matches!(t, Some(Token::Word(x)) if x == w);
    let symbol = |t: Option<&Token>, s: &str| matches!(t, Some(Token::Symbol(x)) if x == s);
    // Grammar constructs that look no name up.
    const SYNTAX: &[&str] = &[
        "if", "elsif", "when", "and", "or", "not", "values", "exists", "array", "all", "any",
        "operator", "coalesce", "greatest", "least", "return", "then", "else", "perform", "select",
    ];
    const LOOKUPS: &[&str] = &[
        "in", "between", "like", "ilike", "similar", "nullif", "distinct",
    ];
    let mut problems = Vec::new();
    let mut in_declare = false;
    for (k, token) in tokens.iter().enumerate() {
        let previous = k.checked_sub(1).and_then(|p| tokens.get(p));
        let next = tokens.get(k + 1);
        match token {
            Token::Word(w) if w == "declare" => in_declare = true,
            Token::Word(w) if w == "begin" => in_declare = false,
            // `name type;` in DECLARE: the type must be pg_catalog's.
            Token::Word(w)
                if in_declare
                    && (symbol(previous, ";") || word(previous, "declare"))
                    && !word(next, "pg_catalog") =>
            {
                problems.push(format!("variable {w} has a type outside pg_catalog"));
            }
            Token::Word(w) if LOOKUPS.contains(&w.as_str()) => {
                problems.push(format!("{w} looks an operator up through the search_path"));
            }
            Token::Word(w) if w == "case" && !word(next, "when") => {
                problems.push("a simple CASE compares with the search_path's =".into());
            }
            Token::Word(w)
                if symbol(next, "(") && !symbol(previous, ".") && !SYNTAX.contains(&w.as_str()) =>
            {
                problems.push(format!("{w}(...) is not schema-qualified"));
            }
            Token::Symbol(s) if s == "::" && !word(next, "pg_catalog") => {
                problems.push("a cast to a type outside pg_catalog".into());
            }
            Token::Symbol(s)
                if s == ":=" || s == ";" || s == "(" || s == ")" || s == "," || s == "." => {}
            Token::Symbol(s)
                if s == "="
                    && matches!(previous, Some(Token::Word(w)) if ["errcode", "hint", "message", "detail"].contains(&w.as_str())) =>
                {}
            Token::Symbol(s)
                if s == "*" && (word(previous, "select") || word(previous, "returning")) => {}
            Token::Symbol(s) if s.chars().all(|c| "+-*/<>=~!@#%^&|?".contains(c)) => {
                let qualified = k >= 3
                    && symbol(tokens.get(k - 1), ".")
                    && word(tokens.get(k - 2), "pg_catalog")
                    && symbol(tokens.get(k - 3), "(")
                    && word(tokens.get(k.wrapping_sub(4)), "operator");
                if !qualified {
                    problems.push(format!("operator {s} is not OPERATOR(pg_catalog.{s})"));
                }
            }
            _ => {}
        }
    }
    problems
}

#[test]
fn the_body_check_finds_what_the_search_path_could_capture() {
    let body = "DECLARE n text; m pg_catalog.int8; BEGIN
        IF a = b OR a OPERATOR(pg_catalog.=) b OR x IN (1) OR nullif(a, b) IS NULL THEN
            PERFORM lower(a); PERFORM pg_catalog.lower(a); PERFORM outbox.f(a::int4, a::pg_catalog.int4);
            RAISE EXCEPTION 'a = b, f(x) IN' USING ERRCODE = 'x', HINT = CASE a WHEN 1 THEN 'y' END;
        END IF; m := 1; END";
    let problems = unqualified_names(body);
    assert_eq!(
        problems,
        [
            "variable n has a type outside pg_catalog",
            "operator = is not OPERATOR(pg_catalog.=)",
            "in looks an operator up through the search_path",
            "nullif looks an operator up through the search_path",
            "lower(...) is not schema-qualified",
            "a cast to a type outside pg_catalog",
            "a simple CASE compares with the search_path's =",
        ],
        "{problems:#?}"
    );
}

/// Every right on schema outbox, its tables and functions, held by anyone but the owner and the
/// three roles, as `grantee: privilege on object` lines.
async fn foreign_rights(db: &Client) -> Vec<String> {
    column(
        db,
        "SELECT format('%s: %s on %s', g.grantee::regrole, g.privilege_type, o.what)
           FROM (SELECT 'schema outbox' AS what, n.nspacl AS acl, n.nspowner AS owner FROM pg_namespace n WHERE n.nspname = 'outbox'
                 UNION ALL SELECT c.oid::regclass::text, c.relacl, c.relowner FROM pg_class c WHERE c.relnamespace = 'outbox'::regnamespace
                 UNION ALL SELECT p.oid::regprocedure::text, coalesce(p.proacl, acldefault('f', p.proowner)), p.proowner
                             FROM pg_proc p WHERE p.pronamespace = 'outbox'::regnamespace) o,
                aclexplode(o.acl) g
          WHERE g.grantee <> o.owner
            AND (g.grantee = 0 OR g.grantee::regrole::text NOT IN ('outbox_publisher', 'outbox_consumer', 'outbox_operator', 'outbox_relay'))
          ORDER BY 1",
    )
    .await
}

async fn default_privileges_of_the_installer_grant_nothing(install: Install) {
    let pg = PgCluster::start_without_extension();
    let admin = pg.superuser().await;
    let installer = match install {
        Install::Extension => "postgres",
        Install::Sql => "installer",
    };
    admin
        .batch_execute(&format!(
            "CREATE ROLE app LOGIN;
             CREATE ROLE installer LOGIN CREATEROLE REPLICATION;
             ALTER DEFAULT PRIVILEGES FOR ROLE {installer} GRANT ALL ON TABLES TO app;
             ALTER DEFAULT PRIVILEGES FOR ROLE {installer} GRANT ALL ON FUNCTIONS TO app;
             ALTER DEFAULT PRIVILEGES FOR ROLE {installer} GRANT ALL ON SCHEMAS TO app;
             ALTER DEFAULT PRIVILEGES FOR ROLE {installer} GRANT ALL ON FUNCTIONS TO PUBLIC;"
        ))
        .await
        .unwrap();
    pg.install_in(install, "postgres").await;
    assert_eq!(foreign_rights(&admin).await, Vec::<String>::new());
    let app = pg.connect_as("app").await;
    for sql in [
        "INSERT INTO outbox.messages (id, queue, payload) VALUES (gen_random_uuid(), 'q', '{}')",
        "CREATE FUNCTION outbox.publish(queue text, payload text) RETURNS uuid LANGUAGE sql AS 'SELECT NULL::uuid'",
        "SELECT outbox.publish('q', '{}')",
    ] {
        let (code, message, _) = expect_error(&app, sql).await;
        assert_eq!(code, "42501", "{sql}: {message}");
    }
    // An upgrade (the SQL install run again as another build) sets them again.
    if install == Install::Sql {
        admin
            .batch_execute(
                "UPDATE outbox.sql_install SET build = 'older';
                 GRANT INSERT ON outbox.messages TO app;",
            )
            .await
            .unwrap();
        let out = pg.run_sql_install("postgres");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("app: INSERT on table outbox.messages"),
            "{stderr}"
        );
        assert_eq!(foreign_rights(&admin).await, Vec::<String>::new());
    }
}

async fn a_publication_another_role_owns_is_refused(install: Install) {
    let pg = PgCluster::start_without_extension();
    let admin = pg.superuser().await;
    admin
        .batch_execute(
            "CREATE ROLE mallory LOGIN;
             GRANT CREATE ON DATABASE postgres TO mallory;",
        )
        .await
        .unwrap();
    pg.connect_as("mallory")
        .await
        .batch_execute("CREATE PUBLICATION pg_outbox")
        .await
        .unwrap();
    let message = match install {
        Install::Extension => expect_error(&admin, "CREATE EXTENSION pg_outbox").await.1,
        Install::Sql => {
            admin
                .batch_execute(
                    "CREATE ROLE installer LOGIN CREATEROLE REPLICATION;
                     GRANT CREATE ON DATABASE postgres TO installer;",
                )
                .await
                .unwrap();
            let out = pg.run_sql_install("postgres");
            assert!(!out.status.success());
            String::from_utf8_lossy(&out.stderr).into_owned()
        }
    };
    assert!(message.contains("publication pg_outbox"), "{message}");
    assert!(message.contains("mallory"), "{message}");
    assert_eq!(
        count(
            &admin,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'outbox'"
        )
        .await,
        0
    );
}

async fn the_size_cap_counts_what_is_sent(install: Install) {
    let pg = PgCluster::start_install(install).await;
    let db = pg.superuser().await;
    db.batch_execute(
        "CREATE ROLE app LOGIN IN ROLE outbox_publisher;
         CREATE TABLE big AS SELECT to_jsonb(repeat('a', 5000000)) AS json, convert_to(repeat('a', 5000000), 'UTF8') AS bytes;
         GRANT SELECT ON big TO app;",
    )
    .await
    .unwrap();
    let app = pg.connect_as("app").await;
    for (sql, payload) in [
        // 144 bytes stored, 3 MB printed.
        (
            "SELECT outbox.publish('q', (SELECT jsonb_agg('1e131071'::numeric) FROM generate_series(1, 25)))",
            "payload 3276850)",
        ),
        (
            "SELECT outbox.publish_batch('q', ARRAY[(SELECT jsonb_agg('1e131071'::numeric) FROM generate_series(1, 25))])",
            "payload 3276850)",
        ),
        // Compressed in a table column: counted at its full size.
        ("SELECT outbox.publish('q', json) FROM big", "payload 5000"),
        ("SELECT outbox.publish_bytes('q', bytes) FROM big", "payload 5000000)"),
        // Headers count as their JSON text too: 100,000 control characters print as 600,000 bytes.
        (
            "SELECT outbox.publish('q', '1', jsonb_build_object('h', repeat(E'\\x01', 100000)))",
            "headers 600009,",
        ),
        // 144 kB stored, 1.18 GB printed: more than any text PostgreSQL can make (1 GB). Still the
        // size-cap error with the exact size, never "out of memory".
        (
            "SELECT outbox.publish('q', (SELECT jsonb_agg('1e131071'::numeric) FROM generate_series(1, 9000)))",
            "(key 0, headers 2, payload 1179666000)",
        ),
        (
            "SELECT outbox.publish_batch('q', ARRAY['1', (SELECT jsonb_agg('1e131071'::numeric) FROM generate_series(1, 9000))])",
            "(key 0, headers 2, payload 1179666000)",
        ),
        // Nested, in an object, beside a string that needs escapes.
        (
            "SELECT outbox.publish('q', jsonb_build_object('a\"b', E'x\\n', 'n', (SELECT jsonb_agg('1e131071'::numeric) FROM generate_series(1, 9000))))",
            "(key 0, headers 2, payload 1179666022)",
        ),
    ] {
        let (code, message, _) = expect_error(&app, sql).await;
        assert_eq!(code, "54000", "{sql}: {message}");
        assert!(message.contains(payload), "{sql}: {message}");
        assert!(
            message.contains("more than pg_outbox.max_message_size (524288 bytes)"),
            "{message}"
        );
    }
    assert_eq!(count(&db, "SELECT count(*) FROM outbox.messages").await, 0);
}

/// A role with CREATE on `public` plants functions that the SQL install, run again (as deploy
/// pipelines do) or as an upgrade, used to call as the installer.
#[tokio::test(flavor = "multi_thread")]
async fn the_sql_install_runs_no_function_planted_in_public() {
    let pg = PgCluster::start_sql_install().await;
    let admin = pg.superuser().await;
    admin
        .batch_execute(
            "CREATE ROLE mallory LOGIN IN ROLE outbox_consumer;
             GRANT CREATE ON SCHEMA public TO mallory;",
        )
        .await
        .unwrap();
    pg.connect_as("mallory")
        .await
        .batch_execute(
            "CREATE FUNCTION public.to_jsonb(s outbox.sql_install) RETURNS jsonb LANGUAGE plpgsql AS $$
             BEGIN EXECUTE 'GRANT outbox_operator TO mallory'; RETURN '{}'; END $$;
             CREATE FUNCTION public.to_jsonb(r record) RETURNS jsonb LANGUAGE plpgsql AS 'BEGIN RETURN NULL; END';
             CREATE FUNCTION public.format(f text, p regprocedure) RETURNS text LANGUAGE plpgsql AS $$
             BEGIN EXECUTE 'GRANT outbox_operator TO mallory'; RETURN pg_catalog.format(f, p); END $$;
             CREATE FUNCTION public.cardinality(a text[]) RETURNS integer LANGUAGE plpgsql AS $$
             BEGIN EXECUTE 'GRANT outbox_operator TO mallory'; RETURN 0; END $$;",
        )
        .await
        .unwrap();
    // Run again (nothing to do), then as an upgrade from another build.
    for build in [None, Some("older")] {
        if let Some(build) = build {
            admin
                .batch_execute(&format!("UPDATE outbox.sql_install SET build = '{build}'"))
                .await
                .unwrap();
        }
        let out = pg.run_sql_install("postgres");
        assert!(
            out.status.success(),
            "{build:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let operator: bool = admin
        .query_one(
            "SELECT pg_has_role('mallory', 'outbox_operator', 'MEMBER')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!operator, "mallory's code ran as the installer");
}

/// A role with CREATE on the database pre-creates what the SQL install would trust: the schema,
/// a version record that says "nothing to do", the publication. Each is refused by name.
#[tokio::test(flavor = "multi_thread")]
async fn the_sql_install_refuses_a_squatted_schema_by_naming_the_squatter() {
    let pg = PgCluster::start_without_extension();
    let admin = pg.superuser().await;
    admin
        .batch_execute(
            "CREATE ROLE mallory LOGIN;
             CREATE ROLE installer LOGIN CREATEROLE REPLICATION;
             GRANT CREATE ON DATABASE postgres TO mallory, installer;",
        )
        .await
        .unwrap();
    let script =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../sql/pg_outbox.sql"))
            .unwrap();
    let build = script
        .split("(SQL install, build ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .expect("the script's build");
    let version = script
        .split("INSERT INTO outbox.sql_install (version, build) VALUES ('")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .expect("the script's version");
    let mallory = pg.connect_as("mallory").await;
    mallory
        .batch_execute(&format!(
            "CREATE SCHEMA outbox;
             CREATE TABLE outbox.sql_install (version text, installed_at timestamptz DEFAULT now(), build text);
             INSERT INTO outbox.sql_install (version, build) VALUES ('{version}', '{build}');"
        ))
        .await
        .unwrap();
    let out = pg.run_sql_install("postgres");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("schema outbox belongs to role mallory, not to installer"),
        "{stderr}"
    );
    // The installer's own schema, but a version record of mallory's in it.
    mallory
        .batch_execute("DROP SCHEMA outbox CASCADE")
        .await
        .unwrap();
    admin
        .batch_execute(
            "CREATE SCHEMA outbox AUTHORIZATION installer;
             GRANT CREATE, USAGE ON SCHEMA outbox TO mallory;",
        )
        .await
        .unwrap();
    mallory
        .batch_execute(&format!(
            "CREATE TABLE outbox.sql_install (version text, installed_at timestamptz DEFAULT now(), build text);
             INSERT INTO outbox.sql_install (version, build) VALUES ('{version}', '{build}');"
        ))
        .await
        .unwrap();
    let out = pg.run_sql_install("postgres");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("relation outbox.sql_install (owner mallory)"),
        "{stderr}"
    );
    // Empty, the installer's, but CREATE granted to mallory: refused as not a SQL install.
    mallory
        .batch_execute("DROP TABLE outbox.sql_install")
        .await
        .unwrap();
    let out = pg.run_sql_install("postgres");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("schema outbox exists already and is not a SQL install"),
        "{stderr}"
    );
}

/// 0.1.0 accepted a schema outbox that another role owns; that role plants a function the 0.1.0
/// -> 0.2.0 upgrade called through the search_path (and would have become SUPERUSER).
#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_refuses_a_schema_another_role_owns() {
    let pg = PgCluster::start_without_extension();
    let admin = pg.superuser().await;
    admin
        .batch_execute(
            "CREATE ROLE mallory LOGIN;
             CREATE SCHEMA outbox AUTHORIZATION mallory;
             CREATE EXTENSION pg_outbox VERSION '0.1.0';
             SELECT outbox.try_mark_processed('billing', 'm-1');",
        )
        .await
        .unwrap();
    pg.connect_as("mallory")
        .await
        .batch_execute(
            "CREATE FUNCTION outbox.cardinality(a text[]) RETURNS integer LANGUAGE plpgsql AS $$
             BEGIN EXECUTE 'ALTER ROLE mallory SUPERUSER'; RETURN 0; END $$;",
        )
        .await
        .unwrap();
    let (code, message, hint) = expect_error(&admin, "ALTER EXTENSION pg_outbox UPDATE").await;
    assert_eq!(code, "42501", "{message}");
    assert!(
        message.contains("schema outbox (owner mallory)"),
        "{message}"
    );
    assert!(
        message.contains("outbox.cardinality(text[]) (owner mallory)"),
        "{message}"
    );
    assert!(
        hint.contains("ALTER SCHEMA outbox OWNER TO postgres"),
        "{hint}"
    );
    let superuser: bool = admin
        .query_one(
            "SELECT rolsuper FROM pg_roles WHERE rolname = 'mallory'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!superuser);
}

/// An empty schema outbox the installer owns, with CREATE granted to another role: adopted, and
/// that right revoked.
#[tokio::test(flavor = "multi_thread")]
async fn create_extension_revokes_what_others_held_on_an_adopted_schema() {
    let pg = PgCluster::start_without_extension();
    let admin = pg.superuser().await;
    admin
        .batch_execute(
            "CREATE ROLE mallory LOGIN;
             CREATE SCHEMA outbox;
             GRANT CREATE, USAGE ON SCHEMA outbox TO mallory;
             CREATE EXTENSION pg_outbox;",
        )
        .await
        .unwrap();
    assert_eq!(foreign_rights(&admin).await, Vec::<String>::new());
    let (code, _, _) = expect_error(
        &pg.connect_as("mallory").await,
        "CREATE FUNCTION outbox.publish(queue text, payload text) RETURNS uuid LANGUAGE sql AS 'SELECT NULL::uuid'",
    )
    .await;
    assert_eq!(code, "42501");
}

/// setseed() makes random() repeat; ids come from a strong random source.
#[tokio::test(flavor = "multi_thread")]
async fn sql_install_ids_stay_unique_whatever_a_session_seeds() {
    let pg = PgCluster::start_sql_install().await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        // Two sessions on the same id clock (a value ahead of the wall clock), same seed.
        let db = pg.superuser().await;
        db.batch_execute(
            "SELECT set_config('pg_outbox._last_micros', '4102444800000000', false);
             SELECT setseed(0.5);",
        )
        .await
        .unwrap();
        let id: uuid::Uuid = db
            .query_one("SELECT outbox.publish('q', '{}')", &[])
            .await
            .unwrap()
            .get(0);
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1]);
}

/// Without a superuser (a managed service), ALTER DATABASE ... SET pg_outbox.* is refused on
/// PostgreSQL 15; an operator sets the SQL install's settings instead, and no publisher can.
#[tokio::test(flavor = "multi_thread")]
async fn an_operator_sets_the_sql_installs_settings_without_superuser() {
    let pg = PgCluster::start_sql_install().await;
    let admin = pg.superuser().await;
    admin
        .batch_execute(
            "CREATE ROLE ops LOGIN IN ROLE outbox_operator;
             CREATE ROLE app LOGIN IN ROLE outbox_publisher;",
        )
        .await
        .unwrap();
    let ops = pg.connect_as("ops").await;
    ops.batch_execute(
        "SELECT outbox.set_setting('pg_outbox.max_message_size', '2');
         SELECT outbox.set_setting('pg_outbox.retention', '5400');",
    )
    .await
    .unwrap();
    let (code, message, hint) = expect_error(
        &ops,
        "SELECT outbox.set_setting('pg_outbox.max_message_size', '100B')",
    )
    .await;
    assert_eq!(code, "22023", "{message}");
    assert_eq!(
        message,
        "invalid value for parameter \"pg_outbox.max_message_size\": \"100B\""
    );
    assert!(hint.contains("outbox.set_setting"), "{hint}");
    let app = pg.connect_as("app").await;
    let (code, message, _) = expect_error(
        &app,
        "SELECT outbox.publish('orders', to_jsonb(repeat('x', 3000)))",
    )
    .await;
    assert_eq!(code, "54000", "{message}");
    assert!(message.contains("(2048 bytes)"), "{message}");
    app.batch_execute("SELECT outbox.publish('orders', to_jsonb(repeat('x', 1500)))")
        .await
        .unwrap();
    let retention: i32 = admin
        .query_one("SELECT outbox._retention_seconds()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(retention, 5400);
    for sql in [
        "SELECT outbox.set_setting('pg_outbox.max_message_size', '64MB')",
        "INSERT INTO outbox.settings (name, value) VALUES ('pg_outbox.retention', '1s')",
        "UPDATE outbox.settings SET value = '64MB'",
    ] {
        let (code, message, _) = expect_error(&app, sql).await;
        assert_eq!(code, "42501", "{sql}: {message}");
    }
    // NULL goes back to the default.
    ops.batch_execute("SELECT outbox.set_setting('pg_outbox.max_message_size', NULL)")
        .await
        .unwrap();
    app.batch_execute("SELECT outbox.publish('orders', to_jsonb(repeat('x', 3000)))")
        .await
        .unwrap();
}

/// An upgrade of the SQL install under traffic: it does not wait behind an open publishing
/// transaction (nor queue new publishes behind itself), a second install at the same time is told
/// so, and a policy of the administrator's that it drops is named.
#[tokio::test(flavor = "multi_thread")]
async fn a_sql_install_upgrade_waits_for_no_publisher_and_says_what_it_drops() {
    let pg = PgCluster::start_sql_install().await;
    let admin = pg.superuser().await;
    admin
        .batch_execute(
            "UPDATE outbox.sql_install SET build = 'older';
             CREATE POLICY mine ON outbox.processed_messages FOR SELECT TO outbox_operator USING (true);",
        )
        .await
        .unwrap();
    // A publishing transaction stays open during the upgrade.
    let publisher = pg.superuser().await;
    publisher
        .batch_execute("BEGIN; SELECT outbox.publish('orders', '{}');")
        .await
        .unwrap();
    let port_holder = std::sync::Arc::new(pg);
    let pg = port_holder.clone();
    let upgrade = tokio::task::spawn_blocking(move || pg.run_sql_install("postgres"));
    let out = match tokio::time::timeout(std::time::Duration::from_secs(30), upgrade).await {
        Ok(out) => out.unwrap(),
        Err(_) => {
            publisher.batch_execute("COMMIT").await.unwrap();
            panic!("the upgrade waited behind an open publishing transaction");
        }
    };
    publisher.batch_execute("COMMIT").await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("dropping policy mine on outbox.processed_messages"),
        "{stderr}"
    );
    // Another install while one runs.
    let pg = port_holder;
    admin
        .batch_execute("SELECT pg_advisory_lock(hashtext('pg_outbox SQL install'), 0)")
        .await
        .unwrap();
    let out = pg.run_sql_install("postgres");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("another session holds the install's lock in this database")
            && stderr.contains("role postgres"),
        "{stderr}"
    );
}

on_both_installs!(redrive_applies_publishs_size_limit);

/// A dead letter written by hand (a worker's role may INSERT them) over the size limit is not
/// published by redrive.
async fn redrive_applies_publishs_size_limit(install: Install) {
    let pg = PgCluster::start_install(install).await;
    let admin = pg.superuser().await;
    admin
        .batch_execute("CREATE ROLE ops LOGIN IN ROLE outbox_relay")
        .await
        .unwrap();
    let ops = pg.connect_as("ops").await;
    ops.batch_execute(
        "INSERT INTO outbox.dead_letters (id, queue, payload, created_at, destination, error, attempts)
         VALUES ('018f0000-0000-7000-8000-000000000001', 'orders', to_jsonb(repeat('a', 600000)),
                 now(), 'kafka:orders', 'too large', 1)",
    )
    .await
    .unwrap();
    let (code, message, _) = expect_error(
        &ops,
        "SELECT outbox.redrive('018f0000-0000-7000-8000-000000000001'::uuid)",
    )
    .await;
    assert_eq!(code, "54000", "{message}");
    assert!(
        message.contains("more than pg_outbox.max_message_size (524288 bytes)"),
        "{message}"
    );
    // One whose JSON text would be more than a text can hold (1.18 GB from 144 kB): the same
    // error, with its exact size (headers: the outbox-redriven-by that redrive adds).
    ops.batch_execute(
        "INSERT INTO outbox.dead_letters (id, queue, payload, created_at, destination, error, attempts)
         VALUES ('018f0000-0000-7000-8000-000000000002', 'orders',
                 (SELECT jsonb_agg('1e131071'::numeric) FROM generate_series(1, 9000)),
                 now(), 'kafka:orders', 'too large', 1)",
    )
    .await
    .unwrap();
    let (code, message, _) = expect_error(
        &ops,
        "SELECT outbox.redrive('018f0000-0000-7000-8000-000000000002'::uuid)",
    )
    .await;
    assert_eq!(code, "54000", "{message}");
    assert!(
        message.contains("(key 0, headers 29, payload 1179666000), more than pg_outbox.max_message_size (524288 bytes)"),
        "{message}"
    );
    assert_eq!(
        count(&admin, "SELECT count(*) FROM outbox.messages").await,
        0
    );
    assert_eq!(
        count(&admin, "SELECT count(*) FROM outbox.dead_letters").await,
        2
    );
}

on_both_installs!(a_restore_without_a_consumers_role_restores_everything_else);

/// A dump restored into a cluster where a registered consumer's role does not exist: everything
/// restores (in one transaction), and that registration is reported when it is used.
async fn a_restore_without_a_consumers_role_restores_everything_else(install: Install) {
    let pg = PgCluster::start_without_extension();
    let admin = pg.superuser().await;
    for database in ["source", "target"] {
        admin
            .batch_execute(&format!("CREATE DATABASE {database}"))
            .await
            .unwrap();
    }
    pg.install_in(install, "source").await;
    admin
        .batch_execute(
            "CREATE ROLE billing_svc LOGIN IN ROLE outbox_consumer;
             CREATE ROLE gone_svc LOGIN IN ROLE outbox_consumer;",
        )
        .await
        .unwrap();
    let source = pg.connect_to("postgres", "source").await;
    source
        .batch_execute(
            "SELECT outbox.register_consumer('billing', 'billing_svc');
             SELECT outbox.register_consumer('gone', 'gone_svc');
             SELECT outbox.publish('orders', '{}');",
        )
        .await
        .unwrap();
    pg.connect_to("billing_svc", "source")
        .await
        .batch_execute("SELECT outbox.try_mark_processed('billing', 'm-1')")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("dump.sql");
    let dump = dump.to_str().unwrap();
    pg.client_program("pg_dump", &["-d", "source", "-f", dump]);
    admin
        .batch_execute("DROP DATABASE source WITH (FORCE)")
        .await
        .unwrap();
    admin.batch_execute("DROP ROLE gone_svc").await.unwrap();
    pg.client_program(
        "psql",
        &[
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-1",
            "-d",
            "target",
            "-f",
            dump,
        ],
    );
    let target = pg.connect_to("postgres", "target").await;
    assert_eq!(
        count(&target, "SELECT count(*) FROM outbox.messages").await,
        1
    );
    assert_eq!(
        count(&target, "SELECT count(*) FROM outbox.consumers").await,
        2
    );
    let billing = pg.connect_to("billing_svc", "target").await;
    let again: bool = billing
        .query_one("SELECT outbox.try_mark_processed('billing', 'm-1')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!again, "the restored mark de-duplicates");
    let (code, message, hint) =
        expect_error(&billing, "SELECT outbox.try_mark_processed('gone', 'm-1')").await;
    assert_eq!(code, "42501", "{message}");
    assert!(
        message.contains("consumer \"gone\" is registered for role gone_svc, which does not exist"),
        "{message}"
    );
    assert!(hint.contains("register_consumer('gone'"), "{hint}");
}

/// The publication's owner changes what it streams (deletes only: committed messages would never
/// reach the slot; every table; a row filter): the worker refuses to stream it, with a hint.
#[tokio::test(flavor = "multi_thread")]
async fn the_worker_refuses_a_publication_that_streams_something_else() {
    let pg = PgCluster::start().await;
    let db = pg.superuser().await;
    db.batch_execute("CREATE TABLE public.other (n int)")
        .await
        .unwrap();
    for (change, expected) in [
        (
            "ALTER PUBLICATION pg_outbox SET (publish = 'delete')",
            "does not stream exactly the inserts",
        ),
        (
            "ALTER PUBLICATION pg_outbox ADD TABLE public.other",
            "not exactly outbox.messages",
        ),
    ] {
        db.batch_execute(&format!(
            "ALTER PUBLICATION pg_outbox SET TABLE outbox.messages;
             ALTER PUBLICATION pg_outbox SET (publish = 'insert');
             {change}"
        ))
        .await
        .unwrap();
        // With start-up setup, and without it (postgres.setup = false: no slot is made).
        for env in [&[][..], &[("OUTBOX_POSTGRES__SETUP", "false")][..]] {
            let mut worker =
                outbox_tests::Worker::start_with(&["run", "--postgres-url", &pg.url()], env, None);
            let status = worker.wait_exit(std::time::Duration::from_secs(30));
            let log = worker.log();
            assert_eq!(status.code(), Some(1), "{change} {env:?}: {log}");
            assert!(
                log.contains("publication \"pg_outbox\" ") && log.contains(expected),
                "{change} {env:?}: {log}"
            );
            assert!(log.contains("SET TABLE outbox.messages"), "{log}");
        }
    }
    // The extension's publication keeps its table: a row filter (which replaces it) is refused.
    let (code, message, _) = expect_error(
        &db,
        "ALTER PUBLICATION pg_outbox SET TABLE outbox.messages WHERE (queue <> 'payments')",
    )
    .await;
    assert_eq!(code, "2BP01", "{message}");
}

/// The SQL install's id clock is a session setting anyone can change: garbage, a number past
/// bigint's range, or a far-future time. 0.2.0 failed with a raw bigint error, or took ids in the
/// year 2100. Now what is not a plain number is ignored and it counts for at most a day ahead.
#[tokio::test(flavor = "multi_thread")]
async fn a_tampered_sql_install_id_clock_gives_neither_errors_nor_far_future_ids() {
    let pg = PgCluster::start_sql_install().await;
    let db = pg.superuser().await;
    for value in [
        "garbage",
        "-5",
        "99999999999999999999",
        "9223372036854775807",
        "4102444800000000",
        "",
    ] {
        db.batch_execute(&format!(
            "SELECT set_config('pg_outbox._last_micros', '{value}', false)"
        ))
        .await
        .unwrap();
        let ahead_ms: i64 = db
            .query_one(
                "SELECT ('x' || substr(replace(id::text, '-', ''), 1, 12))::bit(48)::bigint
                        - (extract(epoch FROM now()) * 1000)::bigint
                   FROM outbox.publish('q', '{}') AS id",
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("{value:?}: {e}"))
            .get(0);
        assert!(
            ahead_ms < 86_400_000 + 60_000,
            "{value:?}: the id is {ahead_ms} ms ahead of now"
        );
    }
}

on_both_installs!(dead_letters_name_who_wrote_them);

/// Members of outbox_relay (workers' roles; every operator before 0.2.2) may INSERT dead letters:
/// one written by hand (an id reused from a real message, a quarantined row copied into a normal
/// one) names the login role that wrote it, which no grantee can set, and redrive says who wrote
/// what it publishes.
async fn dead_letters_name_who_wrote_them(install: Install) {
    let pg = PgCluster::start_install(install).await;
    let admin = pg.superuser().await;
    admin
        .batch_execute(
            "CREATE ROLE alice LOGIN IN ROLE outbox_relay;
             CREATE ROLE bob LOGIN IN ROLE outbox_relay;
             CREATE ROLE team IN ROLE outbox_relay; GRANT team TO alice;
             INSERT INTO outbox.dead_letters (id, queue, payload_bytes, created_at, destination, error, attempts)
                  VALUES ('018f0000-0000-7000-8000-0000000000aa', 'orders', '\\x7b7d', now(), 'quarantine', 'forged', 1);",
        )
        .await
        .unwrap();
    let alice = pg.connect_as("alice").await;
    let bob = pg.connect_as("bob").await;
    const LETTER: &str = "INSERT INTO outbox.dead_letters (id, queue, payload, created_at, destination, error, attempts";
    for (written_by, as_role) in [
        ("'worker'", ""),
        ("NULL", ""),
        ("'worker'", "SET ROLE team; "),
    ] {
        let sql = format!(
            "{as_role}{LETTER}, written_by)
             VALUES ('018f0000-0000-7000-8000-000000000001', 'orders', '{{}}', now(), 'kafka:orders', 'x', 1, {written_by})"
        );
        let (code, message, hint) = expect_error(&alice, &sql).await;
        assert_eq!(code, "42501", "{sql}: {message}");
        assert!(
            message.contains("written_by is the role that writes the row (alice)"),
            "{message}"
        );
        assert!(hint.contains("Leave written_by out"), "{hint}");
        alice.batch_execute("RESET ROLE").await.unwrap();
    }
    // By hand: an id of her choosing, and the quarantined row copied into a normal one (through
    // SET ROLE: still her login role).
    alice
        .batch_execute(&format!(
            "{LETTER}) VALUES ('018f0000-0000-7000-8000-000000000001', 'orders', '{{}}', now(), 'kafka:orders', 'x', 1);
             SET ROLE team;
             {LETTER}) SELECT '018f0000-0000-7000-8000-000000000002', queue, convert_from(payload_bytes, 'UTF8')::jsonb,
                                  created_at, 'kafka:orders', error, attempts
                             FROM outbox.dead_letters WHERE destination = 'quarantine';
             RESET ROLE;"
        ))
        .await
        .unwrap();
    let writers: Vec<String> = column(
        &admin,
        "SELECT id || ' ' || written_by FROM outbox.dead_letters ORDER BY id",
    )
    .await;
    assert_eq!(
        writers,
        [
            "018f0000-0000-7000-8000-000000000001 alice",
            "018f0000-0000-7000-8000-000000000002 alice",
            "018f0000-0000-7000-8000-0000000000aa postgres",
        ]
    );
    // The worker's listing shows it.
    let listed = outbox_tests::worker::run_once(&["dlq", "list", "--postgres-url", &pg.url()], &[]);
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    let header: Vec<&str> = listed.lines().next().unwrap().split('\t').collect();
    let written_by = header
        .iter()
        .position(|h| *h == "written_by")
        .unwrap_or_else(|| panic!("{listed}"));
    let row = listed
        .lines()
        .find(|l| l.starts_with("018f0000-0000-7000-8000-000000000002"))
        .unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(row.split('\t').nth(written_by), Some("alice"), "{listed}");
    // No grantee may change it afterwards either.
    let (code, _, _) = expect_error(
        &alice,
        "UPDATE outbox.dead_letters SET written_by = 'worker'",
    )
    .await;
    assert_eq!(code, "42501");
    // Another operator redrives them and is told who wrote them.
    let redrive = |sql: &str| {
        let out = std::process::Command::new(outbox_tests::postgres::program("psql"))
            .args([
                "-X",
                "-h",
                "127.0.0.1",
                "-p",
                &pg.port.to_string(),
                "-U",
                "bob",
                "-d",
                "postgres",
            ])
            .args(["-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let told = redrive("SELECT outbox.redrive('018f0000-0000-7000-8000-000000000001'::uuid)");
    assert!(
        told.contains("NOTICE:  outbox.redrive: dead letter 018f0000-0000-7000-8000-000000000001 was written by role alice"),
        "{told}"
    );
    let told = redrive("SELECT outbox.redrive('orders')");
    assert!(
        told.contains(
            "NOTICE:  outbox.redrive: 1 dead letter(s) of queue orders written by role alice (1)"
        ),
        "{told}"
    );
    // The table's owner (a restore, a move between installs) keeps what was recorded.
    admin
        .batch_execute(&format!(
            "{LETTER}, written_by) VALUES ('018f0000-0000-7000-8000-000000000003', 'orders', '{{}}', now(), 'kafka:orders', 'x', 1, 'worker')"
        ))
        .await
        .unwrap();
    if install == Install::Sql {
        // An install from before written_by (0.2.0): the column and its trigger are added, the
        // rows it had are by an unrecorded role.
        admin
            .batch_execute(
                "DROP TRIGGER written_by ON outbox.dead_letters;
                 ALTER TABLE outbox.dead_letters DROP COLUMN written_by;
                 UPDATE outbox.sql_install SET version = '0.2.0';",
            )
            .await
            .unwrap();
        let out = pg.run_sql_install("postgres");
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            count(
                &admin,
                "SELECT count(*) FROM outbox.dead_letters WHERE written_by IS NULL"
            )
            .await,
            2
        );
        let (code, _, _) = expect_error(
            &alice,
            &format!("{LETTER}, written_by) VALUES (gen_random_uuid(), 'orders', '{{}}', now(), 'kafka:orders', 'x', 1, 'worker')"),
        )
        .await;
        assert_eq!(code, "42501");
        // Redrive sends only what a worker wrote: an unrecorded writer is refused until the
        // table's owner vouches for the row.
        let (code, message, _) = expect_error(&bob, "SELECT outbox.redrive('orders')").await;
        assert_eq!(code, "42501", "{message}");
        assert!(
            message.contains(
                "written by an unrecorded role (before pg_outbox 0.2.1), not by a worker"
            ),
            "{message}"
        );
        admin
            .batch_execute(
                "UPDATE outbox.dead_letters SET written_by = 'bob'
                  WHERE written_by IS NULL AND destination <> 'quarantine'",
            )
            .await
            .unwrap();
        let told = redrive("SELECT outbox.redrive('orders')");
        assert!(
            told.contains("1 dead letter(s) of queue orders written by role bob (1)"),
            "{told}"
        );
    }
}
