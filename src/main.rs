mod db;
mod loadgen;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use pipeline::config::Pipeline;
use pipeline::runner;
use pipeline::source::ConnInfo;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// Streaming feature engine: Postgres CDC → Arrow micro-batches → DataFusion features → Delta Lake.
#[derive(Parser)]
#[command(name = "pipeline", version, about)]
struct Cli {
    /// Log format (level with RUST_LOG, default info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Known,
    Event,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline: snapshot on first run, then stream until SIGINT/SIGTERM.
    Run {
        pipeline: PathBuf,
        /// Process everything committed before the start, commit, exit.
        #[arg(long)]
        once: bool,
    },
    /// Drop the replication slot and replace every lake table with a new consistent
    /// snapshot, then exit: the way back after the slot was invalidated or dropped.
    Resnapshot { pipeline: PathBuf },
    /// Load the pipeline and its feature files and plan every feature; writes nothing.
    Validate { pipeline: PathBuf },
    /// Print the latest feature row of entities (all when no key is given).
    Latest {
        pipeline: PathBuf,
        /// Entity keys (e.g. client ids).
        keys: Vec<String>,
        /// Feature table (default: the pipeline's first feature file).
        #[arg(long)]
        table: Option<String>,
    },
    /// Print the pipeline's replication slot: acknowledged LSN, WAL retained for it and
    /// how far the lake is behind the source (bytes); fails when the slot is missing.
    Status { pipeline: PathBuf },
    /// Checkpoint, compact and vacuum every table of the pipeline's lake now (`run` also
    /// does this in the background, per `lake.maintenance`).
    Maintain { pipeline: PathBuf },
    /// Rebuild the history of feature tables whose feature file was added or changed, by
    /// replaying the raw change log through the feature engine; `run` streams on after
    /// it. The pipeline must be stopped.
    Backfill {
        pipeline: PathBuf,
        /// Also rebuild this feature file (table name or path) when its columns did not
        /// change (a changed query). Repeatable.
        #[arg(long = "feature-file")]
        feature_files: Vec<String>,
        /// First compare every row the stream wrote with the replayed value at the same
        /// (key, _lsn); write nothing and fail on a mismatch. With nothing to rebuild,
        /// checks every feature table.
        #[arg(long)]
        verify: bool,
        /// Replay (and verify) without writing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Build a point-in-time training set: each spine row (an entity key, a time, and
    /// any labels) with the features as of its time, from the same feature files.
    TrainingSet {
        pipeline: PathBuf,
        /// A Parquet or CSV file, or a SQL query run on the pipeline's source database.
        #[arg(long)]
        spine: String,
        /// Spine column with the entity key.
        #[arg(long)]
        key: String,
        /// Spine column with the time: DATE, TIMESTAMP (no zone = UTC) or text of either.
        /// In known mode a date means its start (00:00 UTC).
        #[arg(long)]
        time: String,
        /// known: the values the pipeline had computed by then (exact, no leak);
        /// event: recomputed as of the row's date over the lake's source rows.
        #[arg(long, value_enum, default_value_t = ModeArg::Known)]
        mode: ModeArg,
        /// Known mode: read this version of the feature table (default: the latest).
        #[arg(long)]
        version: Option<u64>,
        /// Feature table (default: the pipeline's first feature file).
        #[arg(long)]
        table: Option<String>,
        /// Output: a `.parquet` file, otherwise a Delta table (directory or URL), replaced.
        #[arg(long)]
        out: String,
    },
    /// CRM-like load on the pipeline's source database (new clients, applications,
    /// status changes, payments); with --applications, applications submitted and decided
    /// through the API as the CRM would, timed submit → decision.
    Loadgen {
        pipeline: PathBuf,
        /// Background CRM transactions per second.
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// How long (e.g. 30s, 5m).
        #[arg(long, default_value = "60s", value_parser = loadgen::parse_duration)]
        duration: std::time::Duration,
        /// Applications per second, each decided through `POST /v1/decisions`.
        #[arg(long, default_value_t = 0.0)]
        applications: f64,
        /// Postgres connections for the background traffic.
        #[arg(long, default_value_t = 8)]
        connections: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Base URL of the API (default: http://<serve.listen>).
        #[arg(long)]
        api: Option<String>,
    },
    /// Manage the source database.
    Db {
        /// Database URL.
        #[arg(
            long,
            env = "PG_URL",
            default_value = "postgres://postgres@127.0.0.1:5432/de_test_task_db",
            global = true
        )]
        url: String,
        #[command(subcommand)]
        command: DbCommand,
    },
}

#[derive(Subcommand)]
enum DbCommand {
    /// Restore a pg_dump file (custom or plain SQL format, detected).
    Restore {
        dump: PathBuf,
        /// Drop and recreate the database first.
        #[arg(long)]
        clean: bool,
    },
    /// Generate deterministic data of the CRM schema and shape.
    Seed {
        #[arg(long, default_value_t = 20_000)]
        users: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Drop and recreate the database first.
        #[arg(long)]
        clean: bool,
    },
}

fn init_logging(format: LogFormat) {
    // delta-kernel logs an ERROR for every table it opens that does not exist yet (each
    // first run); that is expected here, so it is silenced unless RUST_LOG names it.
    let quiet = "buoyant_kernel::snapshot::builder=off";
    let directives = match std::env::var("RUST_LOG") {
        Ok(v) if v.contains("buoyant_kernel") => v,
        Ok(v) if !v.trim().is_empty() => format!("{v},{quiet}"),
        _ => "warn,pipeline=info,buoyant_kernel=off".to_string(),
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,pipeline=info"));
    // Colours only on a terminal: log files and collectors get plain `key=value` text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The online API of a running pipeline.
struct RunningApi {
    online: pipeline::serve::Online,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    /// The decisions' audit writer, which commits what is queued once stopped.
    audit: Option<tokio::task::JoinHandle<()>>,
}

/// Binds `serve.listen` (failing the start if it cannot) and serves the API until
/// stopped; it answers 503 until the run's snapshot or rebuild is done.
async fn start_api(p: &Pipeline) -> anyhow::Result<RunningApi> {
    use pipeline::serve::{http, Online};
    let config = p.config.serve.clone();
    let metrics = pipeline::metrics::install().context("installing the metrics recorder")?;
    let online = Online::new(p.feature_files.iter().map(|f| f.name.clone()));
    let listener = http::bind(&config).await.with_context(|| {
        format!(
            "{}: serve.listen: cannot listen on {}",
            p.file.display(),
            config.listen
        )
    })?;
    let api = http::Api::new(online.clone(), config.clone(), Some(metrics));
    let stop = CancellationToken::new();
    let mut audit = None;
    let router = match &p.decisions {
        None => api.router(),
        Some(d) => {
            let prepared = runner::prepare(p).await?;
            let outputs = prepared.engine.output_schemas();
            let decisions = pipeline::decide::Decisions::compile(p, &prepared.schemas, &outputs)?
                .expect("the pipeline has a decisions file");
            tracing::info!(rules = d.rules.len(), model = decisions.model_id(),
                file = %d.file.display(), "serving decisions");
            let (routes, task) = decisions.serve(api.clone(), p, stop.clone()).await?;
            audit = Some(task);
            api.router_with(routes)
        }
    };
    let task = tokio::spawn(http::serve(
        listener,
        router,
        config.max_connections,
        stop.clone(),
    ));
    Ok(RunningApi {
        online,
        stop,
        task,
        audit,
    })
}

fn shutdown_on_signal(cancel: CancellationToken) {
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutdown requested: finishing the current batch");
        cancel.cancel();
    });
}

fn main() -> std::process::ExitCode {
    tune_allocator();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(async_main())
}

/// jemalloc by default (feature `jemalloc`). Under sustained load glibc's malloc was about
/// a quarter of the pipeline's CPU (arena locks, `malloc_consolidate`); with jemalloc the
/// same 1,000 tx/s run sees about half the commit → visible latency at every percentile
/// (README, issue 18). `--no-default-features` builds with glibc's.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc runs with its defaults (eight arenas, freed pages kept for reuse up to 10 s), as
/// a service under load wants; `_RJEM_MALLOC_CONF` in the environment overrides them. A
/// `--once` run is a batch job whose peak memory matters more than an allocation's
/// latency: there freed pages go back to the OS at once, as glibc's per-mapping large
/// blocks did. The snapshot frees most of what it allocates; kept for reuse, those pages
/// were ~60 MiB more at the peak of a full-dump `--once` (README, issue 18).
fn return_freed_pages_at_once() {
    #[cfg(feature = "jemalloc")]
    {
        use tikv_jemalloc_ctl::raw;
        // SAFETY: these names take an `ssize_t` (isize) and `unsigned` (u32) as jemalloc
        // documents; a name it refuses (an arena not yet created) only returns an error.
        unsafe {
            // Arenas created from now on, then the ones already there.
            let _ = raw::write(b"arenas.dirty_decay_ms\0", 0isize);
            let arenas = raw::read::<u32>(b"arenas.narenas\0").unwrap_or(0);
            for i in 0..arenas {
                let name = format!("arena.{i}.dirty_decay_ms\0");
                let _ = raw::write(name.as_bytes(), 0isize);
            }
        }
    }
}

#[cfg(all(feature = "mimalloc", not(feature = "jemalloc")))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// glibc's malloc (the global allocator without the `jemalloc` feature, and what C code
/// calls), tuned before any thread starts. Buffers of 128 KiB and more (the
/// state's row buffers and hash tables, Arrow arrays, Parquet pages) get mappings of
/// their own that go back to the OS when freed: by default glibc raises that threshold
/// as such blocks are freed, after which they fragment the heap. And two arenas instead
/// of eight per core: the runtime's many short-lived blocking threads otherwise each
/// keep memory in an arena of their own. Together about 25 MB less at the peak of a
/// full-dump snapshot (see README, Measured).
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

async fn async_main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli.command).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run { pipeline, once } => {
            if once {
                return_freed_pages_at_once();
            }
            let p = Pipeline::load(&pipeline)?;
            let cancel = CancellationToken::new();
            shutdown_on_signal(cancel.clone());
            // A `--once` run is a batch job: nothing to serve.
            let api = match p.config.serve.enabled && !once {
                true => Some(start_api(&p).await?),
                false => None,
            };
            let opts = runner::RunOptions {
                once,
                online: api.as_ref().map(|a| a.online.clone()),
                ..Default::default()
            };
            let result = runner::run_supervised(&p, opts, cancel).await;
            if let Some(api) = api {
                api.stop.cancel();
                api.task.await??;
                if let Some(audit) = api.audit {
                    audit.await?;
                }
            }
            let s = result?;
            tracing::info!(snapshot_rows = s.snapshot_rows, batches = s.batches, changes = s.changes,
                lsn = %s.last_lsn, "pipeline stopped cleanly");
        }
        Command::Resnapshot { pipeline } => {
            let p = Pipeline::load(&pipeline)?;
            let opts = runner::RunOptions {
                resnapshot: true,
                ..Default::default()
            };
            let s = runner::run(&p, opts, CancellationToken::new()).await?;
            println!(
                "resnapshot of {}: {} rows at {}; `pipeline run` streams on from there",
                pipeline.display(),
                s.snapshot_rows,
                s.last_lsn
            );
        }
        Command::Validate { pipeline } => {
            let p = Pipeline::load(&pipeline)?;
            let prepared = runner::prepare(&p).await?;
            let n: usize = p.feature_files.iter().map(|f| f.features.len()).sum();
            let outputs = prepared.engine.output_schemas();
            if let Some(d) = pipeline::decide::Decisions::compile(&p, &prepared.schemas, &outputs)?
            {
                let file = p.decisions.as_ref().expect("compiled from it");
                println!(
                    "ok: {} — {} rules, model {}",
                    file.file.display(),
                    file.rules.len(),
                    d.model_id()
                );
            }
            println!(
                "ok: {} — {n} features in {} file(s) planned against {} ({} tables)",
                pipeline.display(),
                p.feature_files.len(),
                prepared.conn.target(),
                prepared.schemas.len()
            );
        }
        Command::Latest {
            pipeline,
            keys,
            table,
        } => {
            let p = Pipeline::load(&pipeline)?;
            let file = match &table {
                Some(t) => p
                    .feature_files
                    .iter()
                    .find(|f| &f.name == t)
                    .with_context(|| format!("no feature table `{t}` in {}", pipeline.display()))?,
                None => &p.feature_files[0],
            };
            let lake = p.config.lake.open()?;
            let rows = pipeline::serve::latest(&lake, &file.name, &file.entity.key, &keys).await?;
            println!("{}", arrow::util::pretty::pretty_format_batches(&rows)?);
        }
        Command::Status { pipeline } => {
            let p = Pipeline::load(&pipeline)?;
            let Some(s) = runner::slot_status(&p).await? else {
                anyhow::bail!(
                    "{}: no replication slot `{}` (the pipeline has not run against this \
                     database, or the slot was dropped)",
                    pipeline.display(),
                    p.slot_name(&ConnInfo::parse(&p.config.source.url)?.database)
                );
            };
            let num = |v: Option<i64>| v.map_or("-".to_string(), |v| v.to_string());
            println!("slot:                {}", s.slot);
            println!(
                "active:              {}",
                s.active_pid
                    .map_or("no".to_string(), |pid| format!("yes (walsender pid {pid})"))
            );
            println!(
                "confirmed_flush_lsn: {}",
                s.confirmed_flush_lsn
                    .map_or("-".to_string(), |l| l.to_string())
            );
            println!("retained_wal_bytes:  {}", num(s.retained_wal_bytes));
            println!("lag_bytes:           {}", num(s.lag_bytes));
            println!(
                "wal_status:          {}",
                s.wal_status.map_or("-", |w| w.as_str())
            );
            println!(
                "safe_wal_size:       {}",
                s.safe_wal_size
                    .map_or("unlimited".to_string(), |v| v.to_string())
            );
        }
        Command::TrainingSet {
            pipeline,
            spine,
            key,
            time,
            mode,
            version,
            table,
            out,
        } => {
            let p = Pipeline::load(&pipeline)?;
            let req = pipeline::offline::TrainingSetRequest {
                spine: pipeline::offline::SpineSource::parse(&spine)?,
                key,
                time,
                mode: match mode {
                    ModeArg::Known => pipeline::offline::Mode::Known,
                    ModeArg::Event => pipeline::offline::Mode::Event,
                },
                version,
                table,
                out,
            };
            let summary = pipeline::offline::training_set(&p, &req).await?;
            print!("{summary}");
        }
        Command::Backfill {
            pipeline,
            feature_files,
            verify,
            dry_run,
        } => {
            let p = Pipeline::load(&pipeline)?;
            let req = pipeline::offline::BackfillRequest {
                feature_files,
                verify,
                dry_run,
            };
            let summary = pipeline::offline::backfill(&p, &req).await?;
            print!("{summary}");
            if !summary.consistent() {
                anyhow::bail!(
                    "the replay disagrees with what the stream wrote (above): nothing was replaced"
                );
            }
        }
        Command::Maintain { pipeline } => {
            let p = Pipeline::load(&pipeline)?;
            let lake = p.config.lake.open()?;
            for path in pipeline::sink::LakeTable::all_of(&p) {
                let r =
                    pipeline::sink::maintain_table(&lake, &path, &p.config.lake.maintenance, true)
                        .await?;
                println!(
                    "{path}: compacted {} files into {}, vacuumed {}, checkpoint at version {}, {} old log files removed",
                    r.files_compacted,
                    r.files_written,
                    r.files_vacuumed,
                    r.checkpoint_version.unwrap_or(0),
                    r.logs_cleaned
                );
            }
        }
        Command::Loadgen {
            pipeline,
            rate,
            duration,
            applications,
            connections,
            seed,
            api,
        } => {
            let p = Pipeline::load(&pipeline)?;
            let opts = loadgen::LoadOptions {
                rate,
                duration,
                applications,
                connections: connections.max(1),
                seed,
                api,
            };
            loadgen::run(&p, opts).await?;
        }
        Command::Db { url, command } => {
            let info = ConnInfo::parse(&url)?;
            match command {
                DbCommand::Restore { dump, clean } => {
                    db::restore(&info, &dump, clean)
                        .await
                        .with_context(|| format!("restoring {}", dump.display()))?;
                }
                DbCommand::Seed { users, seed, clean } => {
                    let (u, l, p) =
                        db::seed(&info, &db::SeedOptions { users, seed, clean }).await?;
                    println!(
                        "seeded {u} users, {l} loans, {p} payments into {}",
                        info.target()
                    );
                }
            }
        }
    }
    Ok(())
}
