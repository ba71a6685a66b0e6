//! `cmdproc bench` end to end at a small size: every run against the real Kafka and
//! Postgres, with real worker processes, and the report a user reads. Figures are not
//! asserted (speed is what the benchmark reports, not what a test checks); what is
//! asserted is that every run happened, processed everything, and verified exactly-once
//! effects. Needs `deploy/local/up.sh`.

mod support;

use serde_json::Value;

#[test]
fn bench_runs_every_comparison_and_verifies_exactly_once_effects() {
    let out_dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("bench-{}", support::unique()));
    let out = support::cmdproc()
        .args(["bench", "--commands", "3000", "--aggregates", "300"])
        .args([
            "--naive-commands",
            "300",
            "--rate",
            "300",
            "--latency-duration",
            "4s",
        ])
        .args(["--partitions", "4", "--timeout", "120s"])
        // Targets are the caller's: every one given is judged and reported (met or not,
        // at this size and in a debug build, is not what this test checks).
        .args([
            "--target-throughput",
            "20000",
            "--target-vs-naive",
            "15",
            "--target-vs-ceiling",
            "0.6",
            "--target-p99-ms",
            "50",
            "--target-replay",
            "100000",
        ])
        .arg("--out")
        .arg(&out_dir)
        .args([
            "--database-url",
            &support::admin_url(),
            "--brokers",
            support::BROKERS,
        ])
        .output()
        .expect("run cmdproc bench");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "cmdproc bench failed:\n{text}");

    let report: Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("bench.json")).expect("bench.json"))
            .expect("bench.json is JSON");
    let runs = report["runs"].as_array().expect("runs");
    let names: Vec<&str> = runs.iter().map(|r| r["run"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["ceiling", "uniform", "replay", "zipf", "naive", "latency"],
        "{text}"
    );
    for r in runs {
        let name = r["run"].as_str().unwrap();
        let expected = match name {
            "naive" => 300,
            "latency" => 1200,
            _ => 3000,
        };
        assert_eq!(r["commands"], expected, "{name}: {r}");
        assert!(
            r["commands_per_second"].as_f64().unwrap() > 0.0,
            "{name}: {r}"
        );
        if name != "ceiling" {
            // Every run with workers checks its effects against the serial model.
            assert_eq!(r["exactly_once"], true, "{name}: {r}");
            assert!(
                r["peak_worker_memory_mib"].as_f64().unwrap() > 1.0,
                "{name}: {r}"
            );
        }
    }
    let latency = &runs[5]["latency"];
    let (p50, p99) = (
        latency["p50_ms"].as_f64().unwrap(),
        latency["p99_ms"].as_f64().unwrap(),
    );
    assert!(0.0 < p50 && p50 <= p99, "{latency}");
    // Commands sent in the first two seconds are the warm-up; the rest are all sampled.
    assert_eq!(
        latency["samples"].as_u64().unwrap() + latency["warm_up"].as_u64().unwrap(),
        1200,
        "{latency}"
    );
    let targets = report["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 5, "{report}");
    assert!(
        targets.iter().any(|t| t["target"] == "<= 50 ms"),
        "the flags' values are the targets: {report}"
    );

    let svg = std::fs::read_to_string(out_dir.join("bench.svg")).expect("bench.svg");
    for name in ["ceiling", "uniform", "replay", "zipf", "naive", "p99"] {
        assert!(svg.contains(name), "{name} missing from the chart");
    }
    std::fs::remove_dir_all(out_dir).unwrap();
}
