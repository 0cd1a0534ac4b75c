//! `shardgate rebalance ...`, the DBA's command line for slot moves, run as a separate
//! process against a running shardgate (its admin console), as a DBA would.
//!
//! * `move_slots_through_the_cli`: a database on both primaries of the shared cluster
//!   with a sharded table of 20,000 rows placed by a contiguous shard map file; a
//!   shardgate with an admin user fronting it. `shardgate rebalance move --slots 0-15 --to 1`
//!   must exit 0; then the map file gives slots 0-15 to shard 1 (a newer version, and
//!   `shardgate shardmap show` says so), the rows of those slots are on shard 1's
//!   primary and no longer on shard 0's, every row is present exactly once, a moved row
//!   reads back through shardgate, and `rebalance status` (console found from the
//!   `--config` file) lists the move as done. `rebalance plan` answers.
//! * `apply_without_yes_refuses_on_a_non_terminal`: `rebalance apply` with standard input
//!   not a terminal and no `--yes` exits non-zero and says why (no shardgate needed).
//! * `bad_slot_ranges_are_usage_errors`: `--slots 9-3` and `--slots x` exit 2 with a
//!   message naming the problem (no shardgate needed).
//!
//! Run with `./tests/run.sh --test rebalance_cli`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use shardgate_e2e::{connect, skip_in_direct_mode, unique_name, Cluster, Proxy, ScratchDir};
use shardgate_shardmap::{KeyValue, ShardMap, ShardSpec};
use tokio::process::Command;

const SLOTS: u32 = 4096;
const ROWS: i64 = 20_000;
const ADMIN: &str = "rbadmin";
const ADMIN_PASSWORD: &str = "rb-Admin-5t";

/// `$SHARDGATE_BIN`, else the binary `./tests/run.sh` builds (profile `suite`).
fn shardgate_bin() -> PathBuf {
    match std::env::var_os("SHARDGATE_BIN") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/suite/shardgate")
            .to_path_buf(),
    }
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn show(&self) -> String {
        format!(
            "exit {:?}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `shardgate ARGS` with standard input not a terminal, for at most `timeout`.
async fn shardgate(args: &[&str], timeout: Duration) -> Run {
    let bin = shardgate_bin();
    let mut cmd = Command::new(&bin);
    cmd.args(args)
        .env_remove("SHARDGATE_ADMIN_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(timeout, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("shardgate {args:?} did not finish within {timeout:?}"))
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn owner(map: &ShardMap, id: i64) -> u32 {
    map.shard_of_key(&KeyValue::Int(id))
}

fn load_map(path: &Path) -> ShardMap {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    ShardMap::from_toml(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn config_text(db: &str, map_path: &Path, cluster: &Cluster) -> String {
    let mut t = format!(
        "[general]\nlisten = \"$LISTEN\"\npool_mode = \"transaction\"\npool_size = 4\n\
         checkout_timeout = \"10s\"\nclient_login_timeout = \"10s\"\n\n\
         [[users]]\nname = \"app\"\npassword = \"app\"\nauth = \"scram-sha-256\"\n\n\
         [[users]]\nname = \"{ADMIN}\"\npassword = \"{ADMIN_PASSWORD}\"\nauth = \"scram-sha-256\"\n\
         admin = true\nserver_user = \"app\"\nserver_password = \"app\"\n\n\
         [[databases]]\nname = \"{db}\"\nshard_map = \"{}\"\n\
         # Several cut-overs for the ~80 rows of the moving slots; a load sample each second.\n\
         move_batch_rows = 20\nrebalance_interval = \"1s\"\n\n\
         [[databases.sharded_tables]]\nname = \"rb_items\"\ncolumn = \"id\"\ntype = \"bigint\"\n",
        map_path.display()
    );
    for shard in 0..cluster.shards {
        t.push_str(&format!(
            "\n[[databases.shards]]\nhosts = [\"127.0.0.1:{}\"]\n",
            cluster.primary_port(shard)
        ));
    }
    t
}

/// Rows of `ids` in `rb_items` on shard `shard`'s primary.
async fn count_on(cluster: &Cluster, shard: u16, db: &str, ids: &[i64]) -> i64 {
    let c = connect(&cluster.primary_url(shard, db))
        .await
        .unwrap_or_else(|e| panic!("connect to shard {shard}: {e}"));
    c.query_one(
        "SELECT count(*) FROM rb_items WHERE id = ANY($1)",
        &[&ids.to_vec()],
    )
    .await
    .unwrap_or_else(|e| panic!("count on shard {shard}: {e}"))
    .get(0)
}

async fn total_on(cluster: &Cluster, shard: u16, db: &str) -> i64 {
    let c = connect(&cluster.primary_url(shard, db))
        .await
        .unwrap_or_else(|e| panic!("connect to shard {shard}: {e}"));
    c.query_one("SELECT count(*) FROM rb_items", &[])
        .await
        .unwrap_or_else(|e| panic!("count on shard {shard}: {e}"))
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_slots_through_the_cli() {
    if skip_in_direct_mode("move_slots_through_the_cli") {
        return;
    }
    let cluster = Cluster::shared();
    assert!(cluster.shards >= 2, "needs 2 shards: {cluster:?}");
    let db = unique_name("rbcli");
    cluster.recreate_database(&db, "app").await;

    // The map file: contiguous halves (shard 0: slots 0-2047, shard 1: 2048-4095).
    let dir = ScratchDir::new("rbcli");
    let map_path = dir.path().join("shard_map.toml");
    let specs = vec![ShardSpec::default(); usize::from(cluster.shards)];
    let map = ShardMap::initial_contiguous(&specs, SLOTS).expect("initial map");
    std::fs::write(&map_path, map.to_toml()).expect("write the map file");
    let version_before = map.version();

    // Every row on the shard the map gives it, written straight to the primaries.
    let ids: Vec<i64> = (1..=ROWS).collect();
    for shard in 0..cluster.shards {
        let mine: Vec<i64> = ids
            .iter()
            .copied()
            .filter(|id| owner(&map, *id) == u32::from(shard))
            .collect();
        let c = connect(&cluster.primary_url(shard, &db))
            .await
            .unwrap_or_else(|e| panic!("connect to shard {shard}: {e}"));
        c.batch_execute("CREATE TABLE rb_items (id bigint PRIMARY KEY, v text NOT NULL)")
            .await
            .expect("create table");
        c.execute(
            "INSERT INTO rb_items (id, v) SELECT x, 'row ' || x FROM unnest($1::bigint[]) AS x",
            &[&mine],
        )
        .await
        .expect("insert rows");
    }
    let slot = |id: i64| KeyValue::Int(id).slot(SLOTS);
    let moving: Vec<i64> = ids.iter().copied().filter(|id| slot(*id) <= 15).collect();
    assert!(
        !moving.is_empty(),
        "no key of 1..={ROWS} falls in slots 0-15"
    );
    assert_eq!(
        count_on(cluster, 0, &db, &moving).await,
        moving.len() as i64
    );
    assert_eq!(count_on(cluster, 1, &db, &moving).await, 0);
    let shard0_before = total_on(cluster, 0, &db).await;

    let proxy = Proxy::start_config(&config_text(&db, &map_path, cluster)).await;
    let admin_url = proxy.url_for(ADMIN, Some(ADMIN_PASSWORD), "shardgate");
    let map_arg = map_path.display().to_string();

    let run = shardgate(
        &[
            "rebalance",
            "move",
            "--slots",
            "0-15",
            "--to",
            "1",
            "--admin-url",
            &admin_url,
            "--database",
            &db,
        ],
        Duration::from_secs(180),
    )
    .await;
    assert_eq!(
        run.code,
        Some(0),
        "rebalance move:\n{}\n--- shardgate log:\n{}",
        run.show(),
        proxy.log()
    );
    assert!(
        run.stdout.contains("slots 0-15") && run.stdout.contains("done"),
        "the final line names the move and says done:\n{}",
        run.show()
    );

    // The map file: slots 0-15 on shard 1, the rest as before, a newer version.
    let after = load_map(&map_path);
    assert!(
        after.version() > version_before,
        "map version {} not above {version_before}",
        after.version()
    );
    for s in 0..SLOTS {
        let expected = if s <= 15 { 1 } else { map.shard_of_slot(s) };
        assert_eq!(after.shard_of_slot(s), expected, "slot {s} in the new map");
    }
    let show = shardgate(&["shardmap", "show", &map_arg], Duration::from_secs(30)).await;
    assert_eq!(show.code, Some(0), "shardmap show:\n{}", show.show());
    let shard1 = show
        .stdout
        .split("shard 1:")
        .nth(1)
        .unwrap_or_else(|| panic!("shardmap show lists no shard 1:\n{}", show.stdout));
    assert!(
        shard1.contains(" 0-15"),
        "shardmap show does not give 0-15 to shard 1:\n{}",
        show.stdout
    );

    // The rows: on shard 1 now, gone from shard 0, every row once.
    assert_eq!(
        count_on(cluster, 1, &db, &moving).await,
        moving.len() as i64,
        "the moved rows on shard 1"
    );
    assert_eq!(
        count_on(cluster, 0, &db, &moving).await,
        0,
        "moved rows left on shard 0"
    );
    let (t0, t1) = (
        total_on(cluster, 0, &db).await,
        total_on(cluster, 1, &db).await,
    );
    assert_eq!(t0, shard0_before - moving.len() as i64, "shard 0's rows");
    assert_eq!(t0 + t1, ROWS, "every row present exactly once");

    // A moved row reads back through shardgate.
    let client = connect(&proxy.url_for("app", Some("app"), &db))
        .await
        .expect("connect through shardgate");
    let v: String = client
        .query_one("SELECT v FROM rb_items WHERE id = $1", &[&moving[0]])
        .await
        .expect("read a moved row")
        .get(0);
    assert_eq!(v, format!("row {}", moving[0]));

    // The plan answers once a load sample exists (its content depends on the load:
    // there is none here, so most likely no moves).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let plan = shardgate(
            &[
                "rebalance",
                "plan",
                "--admin-url",
                &admin_url,
                "--database",
                &db,
            ],
            Duration::from_secs(30),
        )
        .await;
        if plan.code == Some(0) {
            assert!(
                plan.stdout.contains("moves") && plan.stdout.contains("max/mean"),
                "rebalance plan printed no plan:\n{}",
                plan.show()
            );
            break;
        }
        assert!(
            plan.stderr.contains("no load measured yet") && Instant::now() < deadline,
            "rebalance plan:\n{}",
            plan.show()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // status, with the console found from the config file.
    let config = proxy.config_path().expect("config path");
    let config_arg = config.display().to_string();
    let status = shardgate(
        &[
            "--config",
            &config_arg,
            "rebalance",
            "status",
            "--database",
            &db,
        ],
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(status.code, Some(0), "rebalance status:\n{}", status.show());
    let line = status
        .stdout
        .lines()
        .find(|l| l.contains("0-15"))
        .unwrap_or_else(|| panic!("rebalance status lists no move of 0-15:\n{}", status.stdout));
    assert!(line.contains("done"), "the move is not done: {line}");

    drop(client);
    drop(proxy);
    cluster.drop_database(&db).await;
}

#[tokio::test]
async fn apply_without_yes_refuses_on_a_non_terminal() {
    // Nothing listens there: the refusal must come before any connection attempt.
    let run = shardgate(
        &[
            "rebalance",
            "apply",
            "--admin-url",
            "host=127.0.0.1 port=1 user=nobody dbname=shardgate",
        ],
        Duration::from_secs(30),
    )
    .await;
    assert_ne!(
        run.code,
        Some(0),
        "apply without --yes succeeded:\n{}",
        run.show()
    );
    assert!(
        run.stderr.contains("not a terminal") && run.stderr.contains("--yes"),
        "the refusal should say why and what to do:\n{}",
        run.show()
    );
    assert!(
        !run.stderr.contains("cannot log in"),
        "apply tried to connect before refusing:\n{}",
        run.show()
    );
}

#[tokio::test]
async fn bad_slot_ranges_are_usage_errors() {
    for (slots, expected) in [
        ("9-3", "backwards"),
        ("x", "not a slot number"),
        ("-4", "missing"),
    ] {
        let arg = format!("--slots={slots}");
        let run = shardgate(
            &[
                "rebalance",
                "move",
                &arg,
                "--to",
                "1",
                "--admin-url",
                "host=127.0.0.1 port=1",
            ],
            Duration::from_secs(30),
        )
        .await;
        assert_eq!(run.code, Some(2), "--slots {slots}:\n{}", run.show());
        assert!(
            run.stderr.contains(expected),
            "--slots {slots}: the error should say {expected:?}:\n{}",
            run.show()
        );
    }
}
