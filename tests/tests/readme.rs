//! The README runs as written. Every fenced `sql` block is executed with
//! `psql -v ON_ERROR_STOP=1`, in README order, on a fresh database with the extension and on one
//! with the SQL install (whose API the README says is the same); the block that moves from the
//! SQL install to the extension runs on a SQL install. A block meant as a fragment carries
//! `<!-- fragment: why -->` on the line before its fence and is skipped, with its reason printed.
//! Also: every `sql/examples/*.sql` through psql, every worker configuration example through
//! `outbox-worker check-config`, every `outbox-worker` command line shown (its `--help` and, for
//! `run`, a `check-config` dry run with the same flags), the subcommand table against the CLI,
//! every script a command names, `--help` naming every sink, and no link to a bare GitHub.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use outbox_tests::postgres::{count, program};
use outbox_tests::worker::run_once;
use outbox_tests::PgCluster;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn readme() -> String {
    std::fs::read_to_string(root().join("README.md")).unwrap()
}

/// Printed past the test harness's capture, so that `cargo test` shows the counts.
fn report(text: &str) {
    let _ = writeln!(std::io::stderr(), "{text}");
}

/// One fenced block of the README.
#[derive(Debug)]
struct Block {
    /// Line of its opening fence (1-based).
    line: usize,
    lang: String,
    text: String,
    /// Why it is not run, from `<!-- fragment: why -->` before the fence.
    fragment: Option<String>,
}

fn blocks(markdown: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut open: Option<Block> = None;
    let mut previous = "";
    for (i, line) in markdown.lines().enumerate() {
        let trimmed = line.trim();
        match open.take() {
            Some(block) if trimmed == "```" => blocks.push(block),
            Some(mut block) => {
                block.text.push_str(line);
                block.text.push('\n');
                open = Some(block);
            }
            None if trimmed.starts_with("```") => {
                let fragment = previous
                    .strip_prefix("<!-- fragment:")
                    .and_then(|rest| rest.strip_suffix("-->"))
                    .map(|why| why.trim().to_owned());
                open = Some(Block {
                    line: i + 1,
                    lang: trimmed.trim_start_matches('`').trim().to_owned(),
                    text: String::new(),
                    fragment,
                });
            }
            None => {}
        }
        if !trimmed.is_empty() {
            previous = trimmed;
        }
    }
    assert!(open.is_none(), "an unclosed fence: {open:?}");
    blocks
}

/// `psql -X -v ON_ERROR_STOP=1 -f` of `sql` in `database`, as the superuser; its stdout.
fn psql(pg: &PgCluster, database: &str, sql: &str) -> Result<String, String> {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(sql.as_bytes()).unwrap();
    let port = pg.port.to_string();
    let out = Command::new(program("psql"))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
        .args(["-p", &port, "-U", "postgres", "-d", database, "-f"])
        .arg(file.path())
        .output()
        .expect("psql");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
    }
}

/// One psql session running `steps` (what, SQL) in order, as a reader pasting them into psql
/// would; a failure names the step it happened in.
fn session(pg: &PgCluster, on: &str, steps: &[(String, String)]) -> Result<(), String> {
    let mut script = String::new();
    for (what, sql) in steps {
        let what = what.replace('\'', "''");
        script.push_str(&format!("\\echo '>>> {what}'\n{sql}\n"));
    }
    psql(pg, "postgres", &script).map(drop).map_err(|e| {
        let failed = e
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix(">>> "))
            .unwrap_or("?");
        let sql = steps
            .iter()
            .find(|(what, _)| what == failed)
            .map_or("", |(_, sql)| sql.as_str());
        format!("{on}: {failed} fails:\n{sql}\n{e}")
    })
}

fn block_step(block: &Block) -> (String, String) {
    (format!("README.md:{}", block.line), block.text.clone())
}

/// What the README's reader has before its statements: their own tables and roles.
const READERS_OBJECTS: &str = "
    CREATE ROLE my_service LOGIN; CREATE ROLE my_consumer LOGIN; CREATE ROLE ops LOGIN; CREATE ROLE worker LOGIN;
    CREATE TABLE orders (id bigint PRIMARY KEY, customer text, total numeric);
    CREATE TABLE accounts (id bigint PRIMARY KEY, balance numeric);
    INSERT INTO accounts VALUES (7, 100);";

/// The dead letters the README redrives by id, as the worker would have written them.
fn dead_letters_redriven_in(sql_blocks: &[&Block]) -> String {
    let mut inserts = String::new();
    for block in sql_blocks {
        for piece in block.text.split("outbox.redrive('").skip(1) {
            if let Some((id, rest)) = piece.split_once('\'') {
                if rest.starts_with("::uuid") {
                    inserts.push_str(&format!(
                        "INSERT INTO outbox.dead_letters (id, queue, key, payload, headers, created_at,
                             destination, error, attempts)
                         VALUES ('{id}', 'orders', 'c-7', '{{\"order_id\": 42}}', '{{}}', now(),
                                 'kafka:orders', 'Broker: Message size too large', 5);\n"
                    ));
                }
            }
        }
    }
    inserts
}

#[derive(PartialEq)]
enum Kind {
    /// `CREATE EXTENSION pg_outbox` and what follows it (grants, consumers).
    InstallsTheExtension,
    /// From the SQL install to the extension.
    MovesToTheExtension,
    /// Anything else: the SQL API, the same on both installs.
    Api,
}

fn kind(block: &Block) -> Kind {
    if block.text.contains("ALTER SCHEMA outbox RENAME") {
        Kind::MovesToTheExtension
    } else if block
        .text
        .lines()
        .any(|l| l.starts_with("CREATE EXTENSION pg_outbox"))
    {
        Kind::InstallsTheExtension
    } else {
        Kind::Api
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_sql_block_of_the_readme_runs() {
    let text = readme();
    let all = blocks(&text);
    let sql: Vec<&Block> = all.iter().filter(|b| b.lang == "sql").collect();
    let (skipped, runnable): (Vec<&Block>, Vec<&Block>) =
        sql.iter().partition(|b| b.fragment.is_some());
    let install: Vec<&Block> = runnable
        .iter()
        .copied()
        .filter(|b| kind(b) == Kind::InstallsTheExtension)
        .collect();
    let moves: Vec<&Block> = runnable
        .iter()
        .copied()
        .filter(|b| kind(b) == Kind::MovesToTheExtension)
        .collect();
    let api: Vec<&Block> = runnable
        .iter()
        .copied()
        .filter(|b| kind(b) == Kind::Api)
        .collect();
    assert_eq!(install.len(), 1, "one block installs the extension");
    assert!(api.len() >= 8, "the SQL reference's examples: {api:?}");
    let dead_letters = dead_letters_redriven_in(&api);

    // The extension: the reader's objects, the install block, then every other block in order,
    // in one session.
    let setup = |what: &str, sql: &str| (what.to_owned(), sql.to_owned());
    let pg = PgCluster::start_without_extension();
    let mut steps = vec![
        setup("the reader's own tables and roles", READERS_OBJECTS),
        block_step(install[0]),
        setup("dead letters to redrive", &dead_letters),
    ];
    steps.extend(api.iter().map(|b| block_step(b)));
    let mut failures = Vec::new();
    failures.extend(session(&pg, "the extension", &steps).err());

    // The SQL install (the README's `psql -f sql/pg_outbox.sql`, as a role without superuser):
    // the install block without its CREATE EXTENSION, then the same blocks in the same order.
    let sql_install = PgCluster::start_sql_install().await;
    let grants: String = install[0]
        .text
        .lines()
        .filter(|l| !l.starts_with("CREATE EXTENSION"))
        .map(|l| format!("{l}\n"))
        .collect();
    let mut steps = vec![
        setup("the reader's own tables and roles", READERS_OBJECTS),
        (
            format!("README.md:{} without CREATE EXTENSION", install[0].line),
            grants,
        ),
        setup("dead letters to redrive", &dead_letters),
    ];
    steps.extend(api.iter().map(|b| block_step(b)));
    failures.extend(session(&sql_install, "the SQL install", &steps).err());

    // The move from the SQL install to the extension, with something to carry over.
    for block in &moves {
        let pg = PgCluster::start_sql_install().await;
        let moved = session(
            &pg,
            "a SQL install moving to the extension",
            &[
                setup(
                    "a consumer's mark to carry over",
                    "SELECT outbox.register_consumer('billing', 'outbox_consumer');
                     SELECT outbox.try_mark_processed('billing', 'm-1');",
                ),
                block_step(block),
            ],
        );
        if let Err(e) = moved {
            failures.push(e);
            continue;
        }
        let db = pg.superuser().await;
        assert_eq!(
            count(
                &db,
                "SELECT count(*) FROM pg_extension WHERE extname = 'pg_outbox'"
            )
            .await,
            1
        );
        assert_eq!(
            count(&db, "SELECT count(*) FROM outbox.processed_messages").await,
            1,
            "the mark carried over"
        );
    }

    let executed = install.len() + moves.len() + api.len();
    report(&format!(
        "README.md sql blocks: {} in all, {executed} executed ({} installing the extension, run on \
         the extension and, without CREATE EXTENSION, on the SQL install; {} of the API, run on \
         both installs; {} moving from the SQL install to the extension, run on a SQL install), {} \
         skipped{}",
        sql.len(),
        install.len(),
        api.len(),
        moves.len(),
        skipped.len(),
        skipped
            .iter()
            .map(|b| format!(
                "\n  README.md:{} skipped: {}",
                b.line,
                b.fragment.as_deref().unwrap()
            ))
            .collect::<String>()
    ));
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// sql/examples/*.sql in order through psql on a fresh database with the extension; each asserts
/// its own results.
#[tokio::test(flavor = "multi_thread")]
async fn every_sql_example_runs_with_psql() {
    let pg = PgCluster::start().await;
    let mut examples: Vec<PathBuf> = std::fs::read_dir(root().join("sql/examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .collect();
    examples.sort();
    assert!(!examples.is_empty());
    for example in &examples {
        let sql = std::fs::read_to_string(example).unwrap();
        if let Err(e) = psql(&pg, "postgres", &sql) {
            panic!("{}: {e}", example.display());
        }
    }
    report(&format!(
        "sql/examples: {} files executed with psql -v ON_ERROR_STOP=1",
        examples.len()
    ));
}

fn stdout_of(args: &[&str]) -> String {
    let out = run_once(args, &[]);
    assert!(
        out.status.success(),
        "outbox-worker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every ```toml block that configures the worker passes `check-config`; the Cargo one names a
/// crate and features that exist.
#[test]
fn every_worker_configuration_example_passes_check_config() {
    let mut checked = 0;
    for block in blocks(&readme()).iter().filter(|b| b.lang == "toml") {
        if block.text.contains("[dependencies]") {
            let manifest =
                std::fs::read_to_string(root().join("outbox-client/Cargo.toml")).unwrap();
            assert!(block.text.contains("path = \"outbox-client\""), "{block:?}");
            for feature in ["kafka", "amqp"] {
                assert!(
                    manifest.contains(&format!("\n{feature} = ")),
                    "outbox-client has feature {feature}"
                );
            }
            continue;
        }
        assert!(block.fragment.is_none(), "{block:?}");
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(block.text.as_bytes()).unwrap();
        let path = file.path().to_str().unwrap();
        let out = run_once(&["check-config", "--config", path], &[]);
        assert!(
            out.status.success(),
            "README.md:{}: check-config refuses it: {}",
            block.line,
            String::from_utf8_lossy(&out.stderr)
        );
        checked += 1;
    }
    assert!(checked >= 1);
    report(&format!(
        "README.md worker configurations: {checked} passed check-config"
    ));
}

/// The `outbox-worker` command lines of the README's ```sh blocks and inline code: each parses
/// (`ARGS --help`), and each `run` passes a `check-config` dry run with the same flags. The
/// scripts and files the sh blocks name exist.
#[test]
fn every_command_line_shown_parses() {
    let text = readme();
    let mut lines = Vec::new();
    for block in blocks(&text).iter().filter(|b| b.lang == "sh") {
        let joined = block.text.replace("\\\n", " ");
        for (i, line) in joined.lines().enumerate() {
            let line = line.split(" #").next().unwrap().trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            for word in &words {
                if word.starts_with("./scripts/") || word.starts_with("sql/") {
                    let file = root().join(word.trim_start_matches("./"));
                    assert!(
                        file.exists(),
                        "README.md:{}: {word} does not exist",
                        block.line
                    );
                }
            }
            lines.push((format!("README.md:{} (+{i})", block.line), line.to_owned()));
        }
    }
    for (i, line) in text.lines().enumerate() {
        for span in line.split('`').skip(1).step_by(2) {
            if span.starts_with("outbox-worker ") {
                lines.push((format!("README.md:{}", i + 1), span.to_owned()));
            }
        }
    }
    let mut parsed = 0;
    for (at, line) in &lines {
        let words: Vec<&str> = line.split_whitespace().collect();
        if !words.first().is_some_and(|w| w.ends_with("outbox-worker")) {
            continue;
        }
        // Placeholders the prose fills in: a time.
        let line = words[1..].join(" ");
        let line = line
            .replace("<that time>", "2026-11-23T17:04:05Z")
            .replace("<the time>", "2026-11-23T17:04:05Z");
        assert!(
            !line.contains('<'),
            "{at}: an unknown placeholder in {line}"
        );
        let args: Vec<&str> = line.split_whitespace().collect();
        let mut help = args.clone();
        help.push("--help");
        let out = run_once(&help, &[]);
        assert!(
            out.status.success(),
            "{at}: `outbox-worker {line}` does not parse: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if args.first() == Some(&"run") {
            let mut dry = args.clone();
            dry[0] = "check-config";
            let out = run_once(&dry, &[]);
            assert!(
                out.status.success(),
                "{at}: `outbox-worker {line}` fails a check-config dry run: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        parsed += 1;
    }
    assert!(parsed >= 8, "{lines:?}");
    report(&format!(
        "README.md outbox-worker command lines: {parsed} parsed (the `run` ones also dry-run)"
    ));
}

/// The subcommand table lists every subcommand, and each flag it shows is one the subcommand has.
#[test]
fn the_subcommand_table_matches_the_cli() {
    let text = readme();
    let table = text
        .split_once("| command | what it does |")
        .expect("the subcommand table")
        .1;
    let rows: Vec<&str> = table
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .collect();
    let top = stdout_of(&["--help"]);
    let mut shown = Vec::new();
    for row in &rows {
        let cell = row.split('|').nth(1).unwrap();
        let mut command: Vec<&str> = Vec::new();
        for span in cell.split('`').skip(1).step_by(2) {
            let words: Vec<&str> = span.split_whitespace().collect();
            let flag_at = words
                .iter()
                .position(|w| w.starts_with("--") || w.starts_with('['))
                .unwrap_or(words.len());
            if flag_at > 0 {
                command = words[..flag_at].to_vec();
            }
            let mut help_args = command.clone();
            help_args.push("--help");
            let help = stdout_of(&help_args);
            for flag in words.iter().filter_map(|w| {
                let w = w.trim_matches(|c| c == '[' || c == ']');
                w.starts_with("--").then_some(w)
            }) {
                assert!(
                    help.contains(flag),
                    "`outbox-worker {}` has no {flag}: {help}",
                    command.join(" ")
                );
            }
        }
        shown.push(command[0]);
    }
    let subcommands: Vec<&str> = top
        .split_once("Commands:")
        .unwrap()
        .1
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    for subcommand in &subcommands {
        assert!(
            shown.contains(subcommand),
            "the README's table lacks `{subcommand}`"
        );
    }
}

/// `outbox-worker --help` names every sink, and no doc links to a bare https://github.com/.
#[test]
fn help_names_every_sink_and_no_doc_links_nowhere() {
    let help = stdout_of(&["--help"]).to_lowercase();
    for sink in ["kafka", "rabbitmq", "amqp", "stdout"] {
        assert!(help.contains(sink), "--help does not name {sink}: {help}");
    }
    let run = stdout_of(&["run", "--help"]);
    for flag in ["--kafka-brokers", "--amqp-url", "--amqp-exchange"] {
        assert!(run.contains(flag), "run --help lacks {flag}");
    }
    for file in [
        "README.md",
        "DEVELOPMENT.md",
        "outbox-client/src/lib.rs",
        "outbox-worker/src/lib.rs",
        "outbox-worker/src/main.rs",
        "outbox-client/Cargo.toml",
        "outbox-worker/Cargo.toml",
    ] {
        let text = std::fs::read_to_string(root().join(file)).unwrap();
        assert!(
            !text.contains("https://github.com/)") && !text.contains("https://github.com/\""),
            "{file} links to a bare https://github.com/"
        );
        let lower = text.to_lowercase();
        assert!(
            !lower.contains("kafka or stdout") && !lower.contains("kafka and stdout"),
            "{file} leaves RabbitMQ out"
        );
    }
}

/// The fragment marker is read from the line before the fence, whatever the block's language.
#[test]
fn a_marked_block_is_a_fragment() {
    let markdown = "text\n\n<!-- fragment: a piece of a larger statement -->\n```sql\nWHERE id = 7\n```\n\n```sql\nSELECT 1;\n```\n  ```json\n  {}\n  ```\n";
    let found = blocks(markdown);
    assert_eq!(found.len(), 3, "{found:?}");
    assert_eq!(
        found[0].fragment.as_deref(),
        Some("a piece of a larger statement")
    );
    assert_eq!(
        (found[0].line, found[0].text.as_str()),
        (4, "WHERE id = 7\n")
    );
    assert_eq!(found[1].fragment, None);
    assert_eq!(found[2].lang, "json");
}
