//! The `inventory` example end to end, driven the way its users drive it: through its own
//! binary (`examples/inventory`, `processor::cli::main` with the inventory registry), against
//! the real broker and database. `migrate` a fresh database, `topics create` fresh topics,
//! two `run` workers on four partitions, `produce` a couple of hundred commands as JSON
//! lines on stdin, then every SKU must match a serial model computed here with the same
//! handler, every rejection must be recorded with its code, and `verify` must find no
//! difference. Needs `deploy/local/up.sh`.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::io::Write as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use commands::{Aggregate, CommandId, Context, Source, Topic};
use inventory::{Inventory, InventoryCommand, InventoryState};
use serde_json::{json, Value};
use sqlx::{Connection, Row};
use support::workload::assert_events_published;
use support::{admin_url, unique, wait_processed, TestDb, TestTopics, WorkerProcess};

/// The source of every command this test produces.
const SOURCE: &str = "/inventory-e2e";
const SKUS: usize = 10;
const PARTITIONS: i32 = 4;

/// The example's binary, built here (an up-to-date build costs a second) into the target
/// directory this test was built in (the test executable is
/// `<target>/<profile>/deps/inventory-<hash>`): a run of this suite alone builds only
/// `processor`'s binaries, and a binary left by an older build must not be tested.
fn inventory_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test's own path");
        let profile_dir = exe
            .parent()
            .and_then(|deps| deps.parent())
            .expect("the test runs from <target>/<profile>/deps")
            .to_path_buf();
        let bin = profile_dir.join(format!("inventory{}", std::env::consts::EXE_SUFFIX));
        let target_dir = profile_dir.parent().expect("a target directory");
        let mut build = std::process::Command::new(option_env!("CARGO").unwrap_or("cargo"));
        build
            // Always: cargo does nothing when it is up to date, and a binary left by an
            // older build of the example would be tested instead of this one.
            .args([
                "build",
                "--locked",
                "-p",
                "inventory-cli",
                "--bin",
                "inventory",
            ])
            .env("CARGO_TARGET_DIR", target_dir)
            .current_dir(support::repo_root());
        if profile_dir.file_name().is_some_and(|p| p == "release") {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build -p inventory-cli");
        assert!(
            status.success(),
            "cargo build -p inventory-cli failed: {status}"
        );
        assert!(bin.exists(), "no inventory binary at {}", bin.display());
        bin
    })
    .clone()
}

/// `inventory <args>` with the test's database and topics (the same flags as
/// `support::cmdproc_on`); returns whether it succeeded, its stdout, and its stderr.
fn inventory_on(
    db_url: &str,
    topics: &TestTopics,
    args: &[&str],
    stdin: Option<&str>,
) -> (bool, String, String) {
    let mut program = std::process::Command::new(inventory_bin());
    program.args(args);
    let mut child = support::on_test_services(program, db_url, topics)
        .env("CMDPROC_LOG", "warn")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the inventory binary");
    if let Some(text) = stdin {
        // Written from a thread: the child's stdout could fill while stdin is written.
        let mut pipe = child.stdin.take().expect("stdin is piped");
        let text = text.to_owned();
        std::thread::spawn(move || pipe.write_all(text.as_bytes()).expect("write stdin"));
    }
    let out = child
        .wait_with_output()
        .expect("wait for the inventory binary");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An `inventory run` worker with the flags `support::WorkerProcess::spawn` gives `cmdproc
/// run`, killed when dropped.
fn spawn_worker(db: &TestDb, topics: &TestTopics, name: &str) -> WorkerProcess {
    WorkerProcess::spawn_program(
        std::process::Command::new(inventory_bin()),
        db,
        topics,
        name,
        &[],
        &[],
    )
}

/// Waits until every partition has an owner and each worker owns some, so that both take
/// part; panics with their logs after a minute.
async fn wait_both_own(db: &TestDb, topics: &TestTopics, workers: &[&WorkerProcess]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let owners = support::partition_owners(db, &topics.commands).await;
        let each = workers
            .iter()
            .all(|w| owners.values().any(|(owner, _)| *owner == w.name));
        if owners.len() == topics.partitions as usize && each {
            return;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = workers
                .iter()
                .map(|w| format!("--- {}\n{}", w.log.display(), w.log_tail(30)))
                .collect();
            panic!(
                "the workers did not share the partitions: {owners:?}\n{}",
                logs.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Fresh topic names; the topics themselves are created by `inventory topics create`, and
/// deleted when the value drops.
fn topic_names() -> TestTopics {
    let id = unique();
    let commands = Topic::parse(format!("test-{id}-commands")).unwrap();
    TestTopics {
        events: Topic::parse(format!("test-{id}-events")).unwrap(),
        dead_letters: commands.dead_letter(),
        replies: commands.replies(),
        commands,
        group: format!("test-{id}"),
        partitions: PARTITIONS,
    }
}

/// An empty database, migrated by `inventory migrate` rather than by the test.
async fn empty_db() -> (String, String) {
    let name = format!("cmdproc_test_{}", unique());
    let admin = admin_url();
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .expect("connect to Postgres: is deploy/local/up.sh running?");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create database");
    let base = admin.rsplit_once('/').expect("database URL has a path").0;
    (name.clone(), format!("{base}/{name}"))
}

/// A command as produced: id, SKU, and the typed command.
#[derive(Debug, Clone)]
struct Planned {
    id: String,
    sku: String,
    command: InventoryCommand,
}

impl Planned {
    /// The command as a structured CloudEvent, one JSON line for `produce --file -`.
    fn to_line(&self) -> String {
        let (name, data) = match serde_json::to_value(&self.command).unwrap() {
            Value::Object(map) if map.len() == 1 => map.into_iter().next().unwrap(),
            other => panic!("not an externally tagged command: {other}"),
        };
        json!({
            "specversion": "1.0",
            "id": self.id,
            "source": SOURCE,
            "type": format!("inventory.{name}"),
            "subject": self.sku,
            "datacontenttype": "application/json",
            "data": data,
        })
        .to_string()
    }
}

/// A deterministic pseudo-random sequence (Knuth's MMIX LCG).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// About 200 commands over the SKUs: a first delivery of stock for each, then receipts,
/// reservations (some larger than the stock, some for an order that already holds stock)
/// and releases (some for orders that hold nothing), and a few commands sent twice with the
/// same id, which must take effect once.
fn workload(seed: u64) -> Vec<Planned> {
    let mut rng = Lcg(seed);
    let mut out: Vec<Planned> = (0..SKUS)
        .map(|s| Planned {
            id: format!("c-{s}"),
            sku: format!("sku-{s}"),
            command: InventoryCommand::Receive {
                qty: 5 + rng.below(16),
            },
        })
        .collect();
    while out.len() < 200 {
        let s = rng.below(SKUS as u64);
        let order = format!("ord-{s}-{}", rng.below(6));
        let command = match rng.below(100) {
            0..=14 => InventoryCommand::Receive {
                qty: 1 + rng.below(10),
            },
            15..=69 => InventoryCommand::Reserve {
                order,
                qty: 1 + rng.below(12),
                ttl: None,
            },
            _ => InventoryCommand::Release { order },
        };
        out.push(Planned {
            id: format!("c-{}", out.len()),
            sku: format!("sku-{s}"),
            command,
        });
    }
    // Re-sends: the same source and id again, later on the same key.
    for _ in 0..8 {
        let original = out[rng.below(out.len() as u64) as usize].clone();
        out.push(original);
    }
    out
}

/// What the serial model expects.
#[derive(Debug, Default)]
struct Expected {
    /// Per SKU: state and version (one event per applied command).
    skus: BTreeMap<String, (InventoryState, u64)>,
    /// Per command id: `applied`, or `rejected` with its code.
    outcomes: BTreeMap<String, (String, Option<String>)>,
    /// Per SKU: units received by applied `Receive` commands.
    received: BTreeMap<String, u64>,
    /// Events recorded, over all SKUs.
    events: usize,
    /// Re-sent commands (no effect).
    duplicates: usize,
}

/// Applies the commands in production order (per SKU, the order the workers see), once per
/// id, through the inventory handler itself.
fn serial_model(planned: &[Planned]) -> Expected {
    let source = Source::parse(SOURCE).unwrap();
    let mut expected = Expected::default();
    let mut seen = HashSet::new();
    for p in planned {
        if !seen.insert(p.id.clone()) {
            expected.duplicates += 1;
            continue;
        }
        let (state, version) = expected.skus.entry(p.sku.clone()).or_default();
        let id = CommandId::parse(p.id.as_str()).unwrap();
        let context = Context::new(&id, &source, *version);
        let outcome = match Inventory::handle(state, &p.command, &context) {
            Ok(decision) => {
                if let InventoryCommand::Receive { qty } = p.command {
                    *expected.received.entry(p.sku.clone()).or_default() += qty;
                }
                for event in &decision.events {
                    Inventory::apply(state, event);
                    *version += 1;
                    expected.events += 1;
                }
                ("applied".to_owned(), None)
            }
            Err(rejection) => ("rejected".to_owned(), Some(rejection.code)),
        };
        expected.outcomes.insert(p.id.clone(), outcome);
    }
    expected
}

#[tokio::test(flavor = "multi_thread")]
async fn two_inventory_workers_match_the_serial_model() {
    let planned = workload(2026);
    let expected = serial_model(&planned);
    // The workload is worth running: every outcome occurs.
    let codes: BTreeMap<&str, usize> =
        expected
            .outcomes
            .values()
            .fold(BTreeMap::new(), |mut codes, (outcome, code)| {
                *codes.entry(code.as_deref().unwrap_or(outcome)).or_default() += 1;
                codes
            });
    for code in [
        "applied",
        "insufficient_stock",
        "already_reserved",
        "not_reserved",
    ] {
        assert!(
            codes.contains_key(code),
            "no `{code}` in the workload: {codes:?}"
        );
    }
    assert!(expected.duplicates > 0);

    // A fresh database and topics, set up by the binary's own subcommands.
    let (db_name, db_url) = empty_db().await;
    let topics = topic_names();
    let (ok, out, err) = inventory_on(&db_url, &topics, &["migrate"], None);
    assert!(ok, "inventory migrate failed:\n{out}{err}");
    let partitions = PARTITIONS.to_string();
    let (ok, out, err) = inventory_on(
        &db_url,
        &topics,
        &["topics", "create", "--partitions", &partitions],
        None,
    );
    assert!(ok, "inventory topics create failed:\n{out}{err}");
    assert!(
        out.contains(&format!(
            "created {} ({PARTITIONS} partitions)",
            topics.commands
        )),
        "{out}"
    );
    let pool = processor::store::connect(&db_url, 4, Duration::from_secs(5))
        .await
        .expect("connect to the migrated database");
    let db = TestDb {
        name: db_name,
        url: db_url.clone(),
        pool,
    };

    // Two workers share the four partitions.
    let first = spawn_worker(&db, &topics, "inv-1");
    let second = spawn_worker(&db, &topics, "inv-2");
    wait_both_own(&db, &topics, &[&first, &second]).await;

    let lines: Vec<String> = planned.iter().map(Planned::to_line).collect();
    let stdin = lines.join("\n") + "\n";
    let (ok, out, err) = inventory_on(&db_url, &topics, &["produce", "--file", "-"], Some(&stdin));
    assert!(ok, "inventory produce failed:\n{out}{err}");
    // `<id> <type> <subject> -> partition <p> offset <o>`, one line per command.
    let mut ends = BTreeMap::<i32, i64>::new();
    let mut partition_of = BTreeMap::<String, i32>::new();
    let mut produced = 0;
    for line in out.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let [_id, _type, subject, "->", "partition", p, "offset", o] = words[..] else {
            continue;
        };
        let (p, o): (i32, i64) = (p.parse().unwrap(), o.parse().unwrap());
        let end = ends.entry(p).or_insert(0);
        *end = (*end).max(o + 1);
        let before = partition_of.insert(subject.to_owned(), p);
        assert!(before.is_none_or(|b| b == p), "{subject} on two partitions");
        produced += 1;
    }
    assert_eq!(produced, planned.len(), "produce output:\n{out}{err}");
    assert!(
        ends.len() > 1,
        "all SKUs on one partition: {partition_of:?}"
    );

    wait_processed(
        &db,
        &topics.commands,
        &ends,
        Duration::from_secs(120),
        &[&first, &second],
    )
    .await;

    // Every command once, with the model's outcome and rejection code.
    let rows = sqlx::query(
        "SELECT command_id, outcome, code FROM processed_commands WHERE source = $1 AND topic = $2",
    )
    .bind(SOURCE)
    .bind(topics.commands.as_str())
    .fetch_all(&db.pool)
    .await
    .expect("read processed_commands");
    let recorded: BTreeMap<String, (String, Option<String>)> = rows
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    assert_eq!(rows.len(), recorded.len());
    for (id, want) in &expected.outcomes {
        assert_eq!(recorded.get(id), Some(want), "outcome of command {id}");
    }
    assert_eq!(recorded.len(), expected.outcomes.len(), "commands recorded");
    let duplicates: i64 = sqlx::query_scalar("SELECT count(*) FROM duplicate_deliveries")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        duplicates as usize, expected.duplicates,
        "duplicate deliveries"
    );
    let dead_letters: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(dead_letters, 0, "every command was valid");

    // Each SKU as `inspect` shows it equals the model, rejections with their codes.
    for (sku, (state, version)) in &expected.skus {
        let (ok, out, err) = inventory_on(
            &db_url,
            &topics,
            &["inspect", "inventory", sku, "--limit", "1000"],
            None,
        );
        assert!(ok, "inventory inspect {sku} failed:\n{out}{err}");
        let shown: Value = serde_json::from_str(&out).expect("inspect prints JSON");
        assert_eq!(
            shown["state"],
            serde_json::to_value(state).unwrap(),
            "{sku}"
        );
        assert_eq!(shown["version"], json!(version), "{sku}");
        let shown_commands = shown["recent_commands"].as_array().expect("commands");
        let ids: Vec<&String> = planned
            .iter()
            .filter(|p| &p.sku == sku)
            .map(|p| &p.id)
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(shown_commands.len(), ids.len(), "{sku}: commands shown");
        for c in shown_commands {
            let id = c["id"].as_str().unwrap();
            let (outcome, code) = &expected.outcomes[id];
            assert_eq!(c["outcome"], json!(outcome), "{sku} {id}");
            assert_eq!(c["code"], json!(code), "{sku} {id}");
        }
        // The invariant, read from what is stored: every unit received is available or
        // held, none oversold.
        let available = shown["state"]["available"].as_u64().expect("available");
        let held: u64 = shown["state"]["held"]
            .as_object()
            .expect("held")
            .values()
            .map(|qty| qty.as_u64().expect("a held quantity"))
            .sum();
        assert_eq!(available + held, expected.received[sku], "{sku}");
    }

    // Every event published to the events topic, once.
    let published = assert_events_published(&db, &topics).await;
    assert_eq!(published, expected.events, "events published");

    // `verify` re-executes the commands log through the same handlers: no difference.
    let (ok, out, err) = inventory_on(&db_url, &topics, &["verify"], None);
    assert!(ok, "inventory verify failed:\n{out}{err}");
    assert!(!out.contains("difference:"), "{out}");
    assert!(
        out.contains(&format!("{SKUS} aggregates compared, 0 differences")),
        "{out}"
    );

    drop((first, second));
    db.drop_db().await;
}
