use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use async_trait::async_trait;
use http_body_util::BodyExt;
use serde_json::Value;
use tally_schemas::{Checkpoint, SumSettings};
use tally_sink::store::CheckpointScope;
use tally_sink::SqliteStore;

use super::*;

const WINDOW: i64 = 10_000;
/// 2026-09-21T14:13:20Z, a window boundary.
const T0: i64 = 1_790_000_000_000;

fn key(n: u128) -> Uuid {
    Uuid::from_u128(0x5a5a_0000_0000_4000_8000_0000_0000_0000 | n)
}

fn row(key: Uuid, window: i64, partition: i32, sum: i64, is_final: bool) -> WindowRow {
    WindowRow {
        key,
        window_start_ms: T0 + window * WINDOW,
        window_end_ms: T0 + (window + 1) * WINDOW,
        partition,
        sum,
        count: 1,
        is_final,
        through_offset: 1,
        generation: 0,
    }
}

/// A store in front of SQLite that can hold reads back or fail them.
struct GateStore {
    inner: SqliteStore,
    gate: Semaphore,
    hold: AtomicBool,
    fail: AtomicBool,
    /// Reads that reached the gate.
    entered: AtomicUsize,
}

impl GateStore {
    fn new(inner: SqliteStore) -> Arc<GateStore> {
        Arc::new(GateStore {
            inner,
            gate: Semaphore::new(0),
            hold: AtomicBool::new(false),
            fail: AtomicBool::new(false),
            entered: AtomicUsize::new(0),
        })
    }
}

#[async_trait]
impl WindowStore for GateStore {
    async fn write_rows(&self, rows: &[WindowRow]) -> Result<(), SinkError> {
        self.inner.write_rows(rows).await
    }
    async fn read_rows(
        &self,
        key: Uuid,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> Result<Vec<WindowRow>, SinkError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(SinkError::Unavailable("the test store is down".into()));
        }
        if self.hold.load(Ordering::SeqCst) {
            self.entered.fetch_add(1, Ordering::SeqCst);
            let _released = self.gate.acquire().await;
        }
        self.inner.read_rows(key, from_ms, to_ms, limit).await
    }
    async fn scan_rows(
        &self,
        from_ms: i64,
        to_ms: i64,
        keys: &[Uuid],
    ) -> Result<Vec<WindowRow>, SinkError> {
        self.inner.scan_rows(from_ms, to_ms, keys).await
    }
    async fn save_checkpoint(
        &self,
        scope: &CheckpointScope,
        checkpoint: &Checkpoint,
    ) -> Result<(), SinkError> {
        self.inner.save_checkpoint(scope, checkpoint).await
    }
    async fn load_checkpoint(
        &self,
        scope: &CheckpointScope,
        next_offset: Option<i64>,
    ) -> Result<Option<Checkpoint>, SinkError> {
        self.inner.load_checkpoint(scope, next_offset).await
    }
    async fn load_metadata(&self, name: &str) -> Result<Option<String>, SinkError> {
        self.inner.load_metadata(name).await
    }
    async fn compare_and_set_metadata(
        &self,
        name: &str,
        expected: Option<&str>,
        value: &str,
    ) -> Result<bool, SinkError> {
        self.inner
            .compare_and_set_metadata(name, expected, value)
            .await
    }
    async fn probe(&self) -> Result<(), SinkError> {
        self.inner.probe().await
    }
    fn describe(&self) -> String {
        "gate".into()
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<GateStore>,
    handler: tally_ingest::ReadHandler,
}

fn limits() -> ReadLimits {
    ReadArgs::default().limits().unwrap()
}

async fn fixture_with(limits: ReadLimits, rows: &[WindowRow]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteStore::open(&dir.path().join("read.sqlite")).unwrap();
    sqlite.write_rows(rows).await.unwrap();
    let store = GateStore::new(sqlite);
    let handler = handler(store.clone(), limits);
    Fixture {
        _dir: dir,
        store,
        handler,
    }
}

async fn fixture(rows: &[WindowRow]) -> Fixture {
    fixture_with(limits(), rows).await
}

/// (status, body as JSON, Retry-After).
async fn get(fixture: &Fixture, target: &str) -> (u16, Value, Option<String>) {
    get_with(&fixture.handler, target).await
}

async fn get_with(
    handler: &tally_ingest::ReadHandler,
    target: &str,
) -> (u16, Value, Option<String>) {
    let request = http::Request::get(target).body(()).unwrap();
    let response = handler(request).await;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(http::header::RETRY_AFTER)
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(
        response.headers().get(http::header::CONTENT_TYPE).unwrap(),
        "application/json"
    );
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let json: Value = serde_json::from_slice(&body)
        .unwrap_or_else(|err| panic!("{target}: not JSON ({err}): {body:?}"));
    (status, json, retry_after)
}

fn range(from_window: i64, to_window: i64) -> String {
    format!(
        "from={}&to={}",
        T0 + from_window * WINDOW,
        T0 + to_window * WINDOW
    )
}

#[test]
fn times_format_like_chrono_across_the_accepted_range() {
    let mut ms: i64 = 0;
    let mut step: i64 = 1;
    while ms < MAX_TIME_MS + 400 * 86_400_000 {
        let ours = rfc3339_ms(ms);
        let theirs = chrono::DateTime::from_timestamp_millis(ms)
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        assert_eq!(ours, theirs, "{ms}");
        ms += step;
        step = step * 3 + 7_919;
    }
    assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
    assert_eq!(rfc3339_ms(T0), "2026-09-21T14:13:20.000Z");
    assert_eq!(rfc3339_ms(MAX_TIME_MS), "9999-01-01T00:00:00.000Z");
    assert_eq!(rfc3339_ms(-1), "1969-12-31T23:59:59.999Z");
    // Outside years 0..=9999 (humantime used to panic here): never a panic.
    assert_eq!(rfc3339_ms(253_402_300_800_000), "253402300800000");
    assert_eq!(rfc3339_ms(i64::MAX), i64::MAX.to_string());
    assert_eq!(rfc3339_ms(i64::MIN), i64::MIN.to_string());
}

/// The window JSON as it was written with `format!` before the digit-by-digit
/// writer: the answers must not change.
fn window_json_reference(window: &WindowTotal) -> String {
    format!(
        r#"{{"key":"{}","window_start":"{}","window_end":"{}","sum":{},"count":{},"final":{}}}"#,
        window.key.hyphenated(),
        rfc3339_reference(window.window_start_ms),
        rfc3339_reference(window.window_end_ms),
        window.sum,
        window.count,
        window.is_final
    )
}

fn rfc3339_reference(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .filter(|time| (0..=9999).contains(&chrono::Datelike::year(time)))
        .map(|time| time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| ms.to_string())
}

proptest::proptest! {
    #[test]
    fn window_json_is_what_format_wrote(
        key in proptest::prelude::any::<u128>(),
        start in proptest::prelude::any::<i64>(),
        length in 0i64..1_000_000_000,
        sum in proptest::prelude::any::<i64>(),
        count in proptest::prelude::any::<i64>(),
        is_final in proptest::prelude::any::<bool>(),
        near_now in proptest::prelude::any::<bool>(),
    ) {
        // Half the cases at times an answer really has, half anywhere in i64.
        let start = if near_now { T0 + start.rem_euclid(400 * 365 * 86_400_000) } else { start };
        let window = WindowTotal {
            key: Uuid::from_u128(key),
            window_start_ms: start,
            window_end_ms: start.saturating_add(length),
            sum,
            count,
            is_final,
        };
        let mut ours = String::new();
        window_json(&mut ours, &window);
        proptest::prop_assert_eq!(ours, window_json_reference(&window));
    }
}

#[test]
fn window_json_edges_are_what_format_wrote() {
    for (start, sum) in [
        (0, 0),
        (-1, -1),
        (MAX_TIME_MS, i64::MAX),
        (i64::MIN, i64::MIN),
        (253_402_300_799_999, 1),
        (-62_167_219_200_000, 10),
    ] {
        let window = WindowTotal {
            key: key(7),
            window_start_ms: start,
            window_end_ms: start.saturating_add(WINDOW),
            sum,
            count: sum,
            is_final: sum > 0,
        };
        let mut ours = String::new();
        window_json(&mut ours, &window);
        assert_eq!(ours, window_json_reference(&window));
    }
}

#[test]
fn time_parameters_are_rfc3339_or_epoch_ms_inside_the_accepted_range() {
    assert_eq!(parse_time_ms("2026-09-21T14:13:20Z"), Ok(T0));
    assert_eq!(parse_time_ms("2026-09-21T15:13:20+01:00"), Ok(T0));
    assert_eq!(parse_time_ms("2026-09-21T14:13:20.250Z"), Ok(T0 + 250));
    assert_eq!(parse_time_ms(&T0.to_string()), Ok(T0));
    assert_eq!(parse_time_ms("0"), Ok(0));
    assert_eq!(
        parse_time_ms("8999-12-31T23:59:59.999Z").map(|_| ()),
        Ok(())
    );
    for refused in [
        "-10",
        "-1",
        "253402300800000",
        &MAX_TIME_MS.to_string(),
        "9999-06-01T00:00:00Z",
        "1969-12-31T23:59:59Z",
        "99999999999999999999",
        "yesterday",
        "",
        "2026-09-21",
        "2026-09-21T14:13:20",
    ] {
        assert!(parse_time_ms(refused).is_err(), "{refused:?} was accepted");
    }
    let hint = parse_time_ms("2026-09-21T15:13:20 01:00").unwrap_err();
    assert!(hint.contains("%2B"), "{hint}");
}

#[tokio::test]
async fn far_future_and_negative_times_are_400_invalid_time_not_a_panic() {
    // Issue 11.1: `to=253402300800000` (year 10000) used to panic while formatting
    // the answer, and `from=-10` was answered 200 echoing "-10".
    let fixture = fixture(&[row(key(1), 0, 0, 5, true)]).await;
    let path = format!("/v1/windows/{}", key(1));
    for query in [
        "to=253402300800000".to_owned(),
        format!("from={}&to=253402300800000", T0),
        "from=253402300800000".to_owned(),
        "from=-10".to_owned(),
        format!("from=-10&to={T0}"),
        "from=9223372036854775807".to_owned(),
        "to=10000-01-01T00:00:00Z".to_owned(),
    ] {
        let (status, body, _) = get(&fixture, &format!("{path}?{query}")).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"], "invalid_time", "{query}: {body}");
    }
    let (status, body, _) = get(
        &fixture,
        &format!("/v1/windows?key={}&to=253402300800000", key(1)),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_time")),
        "{body}"
    );
}

#[tokio::test]
async fn query_strings_are_percent_decoded() {
    // Issue 11.2: `%3A` used to be refused, `%2B` too, and a raw `+` taken literally.
    let fixture = fixture(&[row(key(1), 0, 0, 5, true)]).await;
    let path = format!("/v1/windows/{}", key(1));
    let (status, body, _) = get(
        &fixture,
        &format!("{path}?from=2026-09-21T14%3A13%3A20Z&to=2026-09-21T14%3A13%3A30Z"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["from"], "2026-09-21T14:13:20.000Z");
    assert_eq!(body["windows"][0]["sum"], 5);
    let (status, body, _) = get(
        &fixture,
        &format!("{path}?from=2026-09-21T15%3A13%3A20%2B01%3A00&to=2026-09-21T15:13:30%2B01:00"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["from"], "2026-09-21T14:13:20.000Z");
    assert_eq!(body["to"], "2026-09-21T14:13:30.000Z");
    // A raw `+` is a space in a query string: refused, saying how to send it.
    let (status, body, _) = get(&fixture, &format!("{path}?from=2026-09-21T15:13:20+01:00")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_time")),
        "{body}"
    );
    assert!(body["message"].as_str().unwrap().contains("%2B"), "{body}");
    // Parameter names are decoded too.
    let (status, _, _) = get(&fixture, &format!("{path}?%66rom={T0}&to={}", T0 + WINDOW)).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn bounds_are_refused_with_stable_codes() {
    let fixture = fixture(&[]).await;
    let path = format!("/v1/windows/{}", key(1));
    let day = 86_400_000;
    for (query, code) in [
        (format!("from={T0}&to={T0}"), "invalid_range"),
        (format!("from={}&to={T0}", T0 + 1), "invalid_range"),
        (
            format!("from={T0}&to={}", T0 + 31 * day + 1),
            "range_too_long",
        ),
        (format!("from=0&to={T0}"), "range_too_long"),
        (format!("{}&limit=0", range(0, 1)), "invalid_limit"),
        (format!("{}&limit=1001", range(0, 1)), "invalid_limit"),
        (format!("{}&limit=ten", range(0, 1)), "invalid_limit"),
        ("cursor=garbage".to_owned(), "invalid_cursor"),
        (format!("cursor=w1.{}.{}", T0 + 5, T0), "invalid_cursor"),
        (
            format!("cursor=w1.{T0}.{}&from={T0}", T0 + WINDOW),
            "invalid_query",
        ),
        (format!("{}&window=10s", range(0, 1)), "invalid_query"),
        (format!("{}&from={T0}", range(0, 1)), "invalid_query"),
        (format!("{}&key={}", range(0, 1), key(2)), "invalid_query"),
    ] {
        let (status, body, _) = get(&fixture, &format!("{path}?{query}")).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some(code)),
            "{query}: {body}"
        );
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let (status, body, _) = get(&fixture, "/v1/windows/not-a-uuid").await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_key")));
    // Exactly the maximum range is fine.
    let (status, body, _) = get(&fixture, &format!("{path}?from={T0}&to={}", T0 + 31 * day)).await;
    assert_eq!(status, 200, "{body}");
    // Defaults: the last hour up to a little ahead of now.
    let (status, body, _) = get(&fixture, &path).await;
    assert_eq!(status, 200, "{body}");
    let from = parse_time_ms(body["from"].as_str().unwrap()).unwrap();
    let to = parse_time_ms(body["to"].as_str().unwrap()).unwrap();
    assert_eq!(to - from, DEFAULT_LOOKBACK_MS + DEFAULT_AHEAD_MS);
    assert!((to - now_ms() - DEFAULT_AHEAD_MS).abs() < 60_000);
}

#[tokio::test]
async fn an_answer_has_the_total_of_its_range_and_pages_follow_the_cursor() {
    let k = key(1);
    let mut rows = Vec::new();
    for window in 0..25 {
        rows.push(row(k, window, 0, window + 1, window < 20));
        rows.push(row(k, window, 3, 100, true));
    }
    // Another key and rows outside the range stay out.
    rows.push(row(key(2), 3, 0, 1_000, true));
    rows.push(row(k, 30, 0, 1_000, true));
    let fixture = fixture(&rows).await;
    let path = format!("/v1/windows/{k}");
    let (status, first, _) = get(&fixture, &format!("{path}?{}&limit=10", range(0, 25))).await;
    assert_eq!(status, 200, "{first}");
    let expected_sum: i64 = (1..=25).sum::<i64>() + 25 * 100;
    assert_eq!(
        first["total"],
        serde_json::json!({"sum": expected_sum, "count": 50, "windows": 25, "final": false})
    );
    let windows = first["windows"].as_array().unwrap();
    assert_eq!(windows.len(), 10);
    assert_eq!(windows[0]["sum"], 101);
    assert_eq!(windows[0]["count"], 2);
    assert_eq!(windows[0]["final"], true);
    assert_eq!(windows[0]["window_start"], rfc3339_ms(T0));
    assert_eq!(windows[0]["window_end"], rfc3339_ms(T0 + WINDOW));
    assert_eq!(windows[0]["key"], k.to_string());
    let mut seen: Vec<Value> = windows.clone();
    let mut cursor = first["next"].as_str().unwrap().to_owned();
    let mut pages = 1;
    loop {
        let (status, page, _) = get(&fixture, &format!("{path}?cursor={cursor}&limit=10")).await;
        assert_eq!(status, 200, "{page}");
        pages += 1;
        assert!(
            page.get("total").is_none(),
            "continuation pages carry no total"
        );
        assert_eq!(page["to"], rfc3339_ms(T0 + 25 * WINDOW));
        seen.extend(page["windows"].as_array().unwrap().iter().cloned());
        match page.get("next").and_then(Value::as_str) {
            Some(next) => cursor = next.to_owned(),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 25);
    let sum: i64 = seen.iter().map(|w| w["sum"].as_i64().unwrap()).sum();
    assert_eq!(sum, expected_sum);
    let starts: Vec<i64> = seen
        .iter()
        .map(|w| parse_time_ms(w["window_start"].as_str().unwrap()).unwrap())
        .collect();
    assert_eq!(starts, (0..25).map(|w| T0 + w * WINDOW).collect::<Vec<_>>());
    // The default page is --read-page-size; an answer that fits has no `next`.
    let (_, all, _) = get(&fixture, &format!("{path}?{}", range(0, 25))).await;
    assert_eq!(all["windows"].as_array().unwrap().len(), 25);
    assert!(all.get("next").is_none());
    // An empty range: a zero total that is (vacuously) final.
    let (_, empty, _) = get(&fixture, &format!("{path}?{}", range(40, 50))).await;
    assert_eq!(
        empty["total"],
        serde_json::json!({"sum": 0, "count": 0, "windows": 0, "final": true})
    );
}

#[tokio::test]
async fn several_keys_are_answered_with_their_totals() {
    let rows = vec![
        row(key(1), 0, 0, 5, true),
        row(key(1), 1, 0, 6, false),
        row(key(2), 0, 1, 7, true),
        row(key(3), 9, 0, 100, true),
    ];
    let fixture = fixture(&rows).await;
    let query = format!(
        "/v1/windows?key={}&key={}&key={}&key={}&{}",
        key(1),
        key(2),
        key(9),
        key(1).to_string().to_uppercase(),
        range(0, 5)
    );
    let (status, body, _) = get(&fixture, &query).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["from"], rfc3339_ms(T0));
    let keys = body["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 3, "each key once, in request order: {body}");
    assert_eq!(keys[0]["key"], key(1).to_string());
    assert_eq!(
        keys[0]["total"],
        serde_json::json!({"sum": 11, "count": 2, "windows": 2, "final": false})
    );
    assert_eq!(keys[1]["total"]["sum"], 7);
    assert_eq!(keys[1]["total"]["final"], true);
    assert_eq!(keys[2]["key"], key(9).to_string());
    assert_eq!(keys[2]["total"]["windows"], 0);

    let too_many: String = (0..21).map(|i| format!("key={}&", key(100 + i))).collect();
    let (status, body, _) = get(&fixture, &format!("/v1/windows?{too_many}{}", range(0, 1))).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("too_many_keys")),
        "{body}"
    );
    let (status, body, _) = get(&fixture, &format!("/v1/windows?{}", range(0, 1))).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("missing_key")),
        "{body}"
    );
    let (status, body, _) = get(&fixture, "/v1/windows?key=nope").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_key")),
        "{body}"
    );
    let (status, body, _) = get(&fixture, &format!("/v1/windows?key={}&limit=5", key(1))).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_query")),
        "{body}"
    );
    let (status, body, _) = get(
        &fixture,
        &format!(
            "/v1/windows?key={}&from=0&to={}",
            key(1),
            40_i64 * 86_400_000
        ),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("range_too_long")),
        "{body}"
    );
}

#[tokio::test]
async fn rows_of_replaced_settings_and_past_retention_are_not_counted() {
    let k = key(1);
    let now = now_ms();
    let recent = now.div_euclid(WINDOW) * WINDOW - 10 * WINDOW;
    let at = |start: i64, sum: i64, end: i64, generation: u16| WindowRow {
        key: k,
        window_start_ms: start,
        window_end_ms: end,
        partition: 0,
        sum,
        count: 1,
        is_final: true,
        through_offset: 1,
        generation,
    };
    let rows = vec![
        at(recent, 5, recent + WINDOW, 0),
        // Written with a 20 s window: not the pinned settings.
        at(recent + WINDOW, 1_000, recent + 3 * WINDOW, 0),
        // Older than the retention below.
        at(
            recent - 3 * 86_400_000,
            7,
            recent - 3 * 86_400_000 + WINDOW,
            0,
        ),
    ];
    let fixture = fixture(&rows).await;
    tally_sink::pin_settings(
        &*fixture.store,
        SumSettings {
            window_ms: WINDOW,
            grace_ms: 2_000,
        },
    )
    .await
    .unwrap();
    tally_sink::store::record_retention(&*fixture.store, Some(86_400_000))
        .await
        .unwrap();
    let from = recent - 4 * 86_400_000;
    let (status, body, _) = get(
        &fixture,
        &format!("/v1/windows/{k}?from={from}&to={}", now + 60_000),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["total"]["sum"], 5, "{body}");
    assert_eq!(body["windows"].as_array().unwrap().len(), 1);
    let expired_before = parse_time_ms(body["expired_before"].as_str().unwrap()).unwrap();
    assert!(
        (expired_before - (now - 86_400_000)).abs() < 60_000,
        "{body}"
    );
    let (_, body, _) = get(
        &fixture,
        &format!("/v1/windows?key={k}&from={from}&to={}", now + 60_000),
    )
    .await;
    assert_eq!(body["keys"][0]["total"]["sum"], 5, "{body}");
    assert!(body.get("expired_before").is_some());
}

#[tokio::test]
async fn excess_reads_wait_briefly_then_get_503_with_retry_after() {
    let limits = ReadLimits {
        concurrency: 1,
        queue_timeout: Duration::from_millis(100),
        ..limits()
    };
    let fixture = fixture_with(limits, &[row(key(1), 0, 0, 5, true)]).await;
    fixture.store.hold.store(true, Ordering::SeqCst);
    let target = format!("/v1/windows/{}?{}", key(1), range(0, 1));
    let first = {
        let handler = Arc::clone(&fixture.handler);
        let target = target.clone();
        tokio::spawn(async move { get_with(&handler, &target).await })
    };
    // Let the first request take the only slot and block in the store.
    while fixture.store.entered.load(Ordering::SeqCst) == 0 {
        assert!(
            !first.is_finished(),
            "the first read did not wait at the gate"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, body, retry_after) = get(&fixture, &target).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("overloaded")),
        "{body}"
    );
    assert_eq!(retry_after.as_deref(), Some("1"));
    let multi = format!("/v1/windows?key={}&{}", key(1), range(0, 1));
    let (status, body, _) = get(&fixture, &multi).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("overloaded")),
        "{body}"
    );
    // Released, the first one completes and the slot is free again.
    fixture.store.hold.store(false, Ordering::SeqCst);
    fixture.store.gate.add_permits(1);
    let (status, body, _) = first.await.unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, _, _) = get(&fixture, &target).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn an_unavailable_store_is_503_with_retry_after() {
    let fixture = fixture(&[]).await;
    fixture.store.fail.store(true, Ordering::SeqCst);
    let (status, body, retry_after) =
        get(&fixture, &format!("/v1/windows/{}?{}", key(1), range(0, 1))).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("store_unavailable")),
        "{body}"
    );
    assert_eq!(retry_after.as_deref(), Some("1"));
}

#[tokio::test]
async fn other_methods_and_paths_are_refused() {
    let fixture = fixture(&[]).await;
    let request = http::Request::head(format!("/v1/windows/{}", key(1)))
        .body(())
        .unwrap();
    assert_eq!((fixture.handler)(request).await.status(), 405);
    let (status, body, _) = get(&fixture, "/v1/windowsx").await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
}
