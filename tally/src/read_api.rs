//! The read side (CQRS): window totals as JSON. Shared by `GET /v1/windows/{key}` and
//! `GET /v1/windows?key=…` (served by the ingest edge of `tally dev` and of
//! `tally ingest --store`) and `tally query`.
//!
//! Reads are bounded, so no request can make the store do unbounded work:
//! - at most `--read-concurrency` store reads run at once in the process; a request
//!   that finds none free waits up to `--read-queue-timeout`, then gets `503
//!   overloaded` with `Retry-After`;
//! - a request covers at most `--read-max-range` (`400 range_too_long` beyond);
//! - an answer lists at most `--read-page-size` windows (`limit` asks for fewer) and
//!   says where to continue (`next`, a cursor);
//! - the multi-key form answers at most `--read-max-keys` keys (`400 too_many_keys`).
//!
//! Every time parameter is validated into [`MIN_TIME_MS`, `MAX_TIME_MS`) (1970 to the
//! start of year 9999) before anything else, so the answer's times are always valid
//! RFC 3339 date-times; query strings are form-urlencoded (`%3A`, `%2B`; a raw `+` is
//! a space).
//!
//! The window size comes from the store (the settings the aggregators pinned): rows
//! written under settings a replay replaced are skipped, and so are rows past the
//! retention the aggregators recorded (`expired_before` in the answer).

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use tally_schemas::PinnedSettings;
use tally_sink::store::{visit_windows, READ_CHUNK_ROWS};
use tally_sink::{RangeTotal, SinkError, WindowRow, WindowStore, WindowTotal};
use tokio::sync::{Mutex, Semaphore};
use uuid::Uuid;

/// Range used when `from` is not given: the last hour.
const DEFAULT_LOOKBACK_MS: i64 = 3_600_000;

/// `to` when not given: now plus the default `--max-future-skew`, so windows of
/// records stamped a little ahead (which the aggregator accepts) are included.
const DEFAULT_AHEAD_MS: i64 = 300_000;

/// The earliest time a parameter may name: the Unix epoch.
pub const MIN_TIME_MS: i64 = 0;

/// The first time a parameter may not name: 9999-01-01T00:00:00Z. A year short of
/// what RFC 3339 can write, so a window end after any accepted time still can.
pub const MAX_TIME_MS: i64 = 253_370_764_800_000;

/// How long the store's settings and retention are reused before being read again.
const METADATA_TTL: Duration = Duration::from_secs(5);

/// The bounds of the read API (`tally ingest` flags).
#[derive(clap::Args, Debug, Clone)]
pub struct ReadArgs {
    /// Most store reads running at once in this process (the read API); more requests
    /// wait up to --read-queue-timeout, then get 503 overloaded.
    #[arg(long, env = "TALLY_READ_CONCURRENCY", default_value_t = 32)]
    pub read_concurrency: usize,
    /// How long a read waits for a free slot before 503 overloaded (with Retry-After).
    #[arg(long, env = "TALLY_READ_QUEUE_TIMEOUT", default_value = "250ms", value_parser = tally_aggregator::config::parse_duration)]
    pub read_queue_timeout: Duration,
    /// Longest `to - from` one read may cover (400 range_too_long beyond).
    #[arg(long, env = "TALLY_READ_MAX_RANGE", default_value = "31d", value_parser = tally_aggregator::config::parse_duration)]
    pub read_max_range: Duration,
    /// Most windows in one answer (and the default `limit`); `next` continues.
    #[arg(long, env = "TALLY_READ_PAGE_SIZE", default_value_t = 1000)]
    pub read_page_size: usize,
    /// Most keys in one `GET /v1/windows?key=…` request.
    #[arg(long, env = "TALLY_READ_MAX_KEYS", default_value_t = 20)]
    pub read_max_keys: usize,
}

impl Default for ReadArgs {
    fn default() -> Self {
        ReadArgs {
            read_concurrency: 32,
            read_queue_timeout: Duration::from_millis(250),
            read_max_range: Duration::from_secs(31 * 86_400),
            read_page_size: 1000,
            read_max_keys: 20,
        }
    }
}

/// [`ReadArgs`], validated.
#[derive(Debug, Clone, Copy)]
pub struct ReadLimits {
    pub concurrency: usize,
    pub queue_timeout: Duration,
    pub max_range_ms: i64,
    pub page_size: usize,
    pub max_keys: usize,
}

impl ReadArgs {
    pub fn limits(&self) -> anyhow::Result<ReadLimits> {
        anyhow::ensure!(
            self.read_concurrency >= 1,
            "--read-concurrency must be at least 1"
        );
        anyhow::ensure!(
            self.read_page_size >= 1,
            "--read-page-size must be at least 1"
        );
        anyhow::ensure!(
            self.read_max_keys >= 1,
            "--read-max-keys must be at least 1"
        );
        let max_range_ms = i64::try_from(self.read_max_range.as_millis()).unwrap_or(i64::MAX);
        anyhow::ensure!(max_range_ms >= 1, "--read-max-range must be positive");
        Ok(ReadLimits {
            concurrency: self.read_concurrency,
            queue_timeout: self.read_queue_timeout,
            max_range_ms,
            page_size: self.read_page_size,
            max_keys: self.read_max_keys,
        })
    }
}

// ---- times -------------------------------------------------------------------------

/// Milliseconds since the epoch as RFC 3339 with milliseconds (UTC), e.g.
/// `2026-11-21T10:00:00.000Z`. Never panics: a time outside years 0000..=9999 (which
/// no validated parameter and no window of one can produce) is written as epoch ms.
pub fn rfc3339_ms(ms: i64) -> String {
    let mut out = String::with_capacity(24);
    if !write_rfc3339_ms(&mut out, ms) {
        out.clear();
        out.push_str(&ms.to_string());
    }
    out
}

/// Appends `ms` as RFC 3339 to `out`; false (appending nothing) outside years 0..=9999.
/// Digits are written directly (no `fmt` machinery): the read API writes two of these
/// per window, hundreds of windows per answer.
fn write_rfc3339_ms(out: &mut String, ms: i64) -> bool {
    // 0000-01-01T00:00:00Z and 10000-01-01T00:00:00Z.
    const FIRST: i64 = -62_167_219_200_000;
    const END: i64 = 253_402_300_800_000;
    if !(FIRST..END).contains(&ms) {
        return false;
    }
    let days = ms.div_euclid(86_400_000);
    let in_day = ms.rem_euclid(86_400_000);
    let (year, month, day) = civil_from_days(days);
    let mut text = *b"0000-00-00T00:00:00.000Z";
    put_digits(&mut text[0..4], year);
    put_digits(&mut text[5..7], month);
    put_digits(&mut text[8..10], day);
    put_digits(&mut text[11..13], in_day / 3_600_000);
    put_digits(&mut text[14..16], in_day / 60_000 % 60);
    put_digits(&mut text[17..19], in_day / 1000 % 60);
    put_digits(&mut text[20..23], in_day % 1000);
    // Only ASCII digits and separators were written, so this always succeeds.
    match std::str::from_utf8(&text) {
        Ok(text) => {
            out.push_str(text);
            true
        }
        Err(_) => false,
    }
}

/// Writes the last `slot.len()` decimal digits of `value` (≥ 0) into `slot`, zero-padded.
fn put_digits(slot: &mut [u8], mut value: i64) {
    for digit in slot.iter_mut().rev() {
        *digit = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// (year, month, day) of a day count since 1970-01-01 (proleptic Gregorian; Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Parses a time given as RFC 3339 (`2026-11-21T10:00:00Z`, `…+01:00`, fractions of a
/// second) or as epoch milliseconds, accepting only [`MIN_TIME_MS`, `MAX_TIME_MS`).
pub fn parse_time_ms(text: &str) -> Result<i64, String> {
    let ms = if !text.is_empty()
        && text
            .strip_prefix('-')
            .unwrap_or(text)
            .bytes()
            .all(|b| b.is_ascii_digit())
    {
        text.parse::<i64>()
            .map_err(|_| format!("{text:?} is out of range"))?
    } else {
        let time = chrono::DateTime::parse_from_rfc3339(text).map_err(|err| {
            let hint = if text.contains(' ') {
                " (in a query string a raw `+` is a space: send an offset as %2B01:00)"
            } else {
                ""
            };
            format!("{text:?} is neither RFC 3339 (2026-11-21T10:00:00Z) nor epoch milliseconds: {err}{hint}")
        })?;
        time.timestamp_millis()
    };
    if !(MIN_TIME_MS..MAX_TIME_MS).contains(&ms) {
        return Err(format!(
            "{text:?} is outside the times this API accepts, {} to {} (exclusive)",
            rfc3339_ms(MIN_TIME_MS),
            rfc3339_ms(MAX_TIME_MS)
        ));
    }
    Ok(ms)
}

/// The range `[from, to)` that `from`/`to` (either may be missing) ask for at `now`:
/// by default the last hour, up to a little ahead of now. Refusals carry their code
/// (`invalid_time`, `invalid_range`).
pub fn resolve_range(
    from: Option<&str>,
    to: Option<&str>,
    now: i64,
) -> Result<(i64, i64), (&'static str, String)> {
    let time = |name: &str, value: Option<&str>, default: i64| match value {
        Some(text) => {
            parse_time_ms(text).map_err(|message| ("invalid_time", format!("`{name}`: {message}")))
        }
        None => Ok(default.clamp(MIN_TIME_MS, MAX_TIME_MS - 1)),
    };
    let to = time("to", to, now.saturating_add(DEFAULT_AHEAD_MS))?;
    let from = time(
        "from",
        from,
        to.min(now).saturating_sub(DEFAULT_LOOKBACK_MS),
    )?;
    if to <= from {
        return Err(("invalid_range", "`to` must be after `from`".to_owned()));
    }
    Ok((from, to))
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

// ---- what the store says about its rows ---------------------------------------------

/// What readers need to know about a store besides its rows.
#[derive(Debug, Clone, Default)]
pub struct StoreView {
    /// The pinned settings (`None` for a store no aggregator pinned yet).
    pub settings: Option<PinnedSettings>,
    /// The retention the aggregators recorded (ms).
    pub retention_ms: Option<i64>,
}

impl StoreView {
    pub async fn load(store: &dyn WindowStore) -> Result<StoreView, SinkError> {
        Ok(StoreView {
            settings: tally_sink::load_settings(store).await?,
            retention_ms: tally_sink::load_retention(store).await?,
        })
    }

    /// Whether readers count `row` at `now_ms`: written under the settings in force
    /// for its window, and not past retention.
    pub fn keeps(&self, row: &WindowRow, now_ms: i64) -> bool {
        self.settings.as_ref().is_none_or(|settings| {
            settings.row_is_current(row.window_start_ms, row.window_end_ms, row.generation)
        }) && self.retention_ms.is_none_or(|retention| {
            !tally_sink::row::is_expired(row.window_end_ms, retention, now_ms)
        })
    }

    /// Windows that ended at or before this are past retention, hence gone.
    pub fn expired_before(&self, now_ms: i64) -> Option<i64> {
        self.retention_ms
            .map(|retention| now_ms.saturating_sub(retention).max(MIN_TIME_MS))
    }
}

/// One page of one key's windows.
#[derive(Debug, Clone, Default)]
pub struct WindowsPage {
    pub windows: Vec<WindowTotal>,
    /// Over the whole range, when asked for.
    pub total: Option<RangeTotal>,
    /// Where the next page starts, if more windows follow.
    pub next_ms: Option<i64>,
}

/// The first `limit` windows of `key` starting in `[from_ms, to_ms)` and, with
/// `with_total`, the total over all of them.
pub async fn read_page(
    store: &dyn WindowStore,
    view: &StoreView,
    key: Uuid,
    (from_ms, to_ms): (i64, i64),
    limit: usize,
    with_total: bool,
) -> Result<WindowsPage, SinkError> {
    let now = now_ms();
    let mut page = WindowsPage {
        total: with_total.then(RangeTotal::default),
        ..WindowsPage::default()
    };
    visit_windows(
        store,
        key,
        from_ms,
        to_ms,
        READ_CHUNK_ROWS,
        |row| view.keeps(row, now),
        |window| {
            if let Some(total) = page.total.as_mut() {
                total.add(&window);
            }
            if page.windows.len() < limit {
                page.windows.push(window);
            } else if page.next_ms.is_none() {
                page.next_ms = Some(window.window_start_ms);
                if !with_total {
                    return ControlFlow::Break(());
                }
            }
            ControlFlow::Continue(())
        },
    )
    .await?;
    Ok(page)
}

/// The total of `key` over `[from_ms, to_ms)`.
pub async fn read_total(
    store: &dyn WindowStore,
    view: &StoreView,
    key: Uuid,
    range: (i64, i64),
) -> Result<RangeTotal, SinkError> {
    Ok(read_page(store, view, key, range, 0, true)
        .await?
        .total
        .unwrap_or_default())
}

// ---- JSON ----------------------------------------------------------------------------

/// One window as the API and `tally query` print it.
pub fn window_json(out: &mut String, window: &WindowTotal) {
    let mut buffer = Uuid::encode_buffer();
    window_json_keyed(
        out,
        window.key.hyphenated().encode_lower(&mut buffer),
        window,
    );
}

/// [`window_json`] with the window's key already written as text (`key_text`), for
/// answers whose windows all have one key: the key is then encoded once, not per window.
fn window_json_keyed(out: &mut String, key_text: &str, window: &WindowTotal) {
    let mut number = itoa::Buffer::new();
    out.push_str(r#"{"key":""#);
    out.push_str(key_text);
    out.push_str(r#"","window_start":""#);
    push_time(out, window.window_start_ms);
    out.push_str(r#"","window_end":""#);
    push_time(out, window.window_end_ms);
    out.push_str(r#"","sum":"#);
    out.push_str(number.format(window.sum));
    out.push_str(r#","count":"#);
    out.push_str(number.format(window.count));
    out.push_str(if window.is_final {
        r#","final":true}"#
    } else {
        r#","final":false}"#
    });
}

/// A range total: `{"sum":…,"count":…,"windows":…,"final":…}`.
pub fn total_json(out: &mut String, total: &RangeTotal) {
    use std::fmt::Write;
    let _ = write!(
        out,
        r#"{{"sum":{},"count":{},"windows":{},"final":{}}}"#,
        total.sum, total.count, total.windows, total.all_final
    );
}

fn push_time(out: &mut String, ms: i64) {
    if !write_rfc3339_ms(out, ms) {
        out.push_str(&ms.to_string());
    }
}

fn push_field_time(out: &mut String, name: &str, ms: i64) {
    out.push('"');
    out.push_str(name);
    out.push_str(r#"":""#);
    push_time(out, ms);
    out.push('"');
}

// ---- the HTTP handler ------------------------------------------------------------------

/// A continuation cursor: where the next page starts and where the range ends.
/// Opaque to clients; `w1.<next ms>.<to ms>`.
fn cursor(next_ms: i64, to_ms: i64) -> String {
    format!("w1.{next_ms}.{to_ms}")
}

fn parse_cursor(text: &str) -> Option<(i64, i64)> {
    let rest = text.strip_prefix("w1.")?;
    let (next, to) = rest.split_once('.')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(next) || !digits(to) {
        return None;
    }
    let (next, to) = (next.parse().ok()?, to.parse().ok()?);
    ((MIN_TIME_MS..MAX_TIME_MS).contains(&next) && next < to && to <= MAX_TIME_MS)
        .then_some((next, to))
}

/// A refusal: status, stable `error` code and message.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
}

fn bad(code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        status: StatusCode::BAD_REQUEST,
        code,
        message: message.into(),
    }
}

impl From<SinkError> for Refusal {
    fn from(err: SinkError) -> Self {
        let (status, code) = if err.is_retryable() {
            (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable")
        } else if matches!(err, SinkError::Config(_)) {
            (StatusCode::BAD_REQUEST, "invalid_query")
        } else {
            (StatusCode::INTERNAL_SERVER_ERROR, "store_error")
        };
        Refusal {
            status,
            code,
            message: err.to_string(),
        }
    }
}

/// The parameters of a request, parsed and checked.
#[derive(Debug, Default)]
struct Params {
    keys: Vec<Uuid>,
    from: Option<String>,
    to: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

impl Params {
    fn parse(query: &str, multi_key: bool, max_keys: usize) -> Result<Params, Refusal> {
        let mut params = Params::default();
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            let slot = match name.as_ref() {
                "from" => &mut params.from,
                "to" => &mut params.to,
                "limit" if !multi_key => &mut params.limit,
                "cursor" if !multi_key => &mut params.cursor,
                "key" if multi_key => {
                    let key = Uuid::try_parse(&value)
                        .map_err(|_| bad("invalid_key", format!("key {value:?} is not a UUID")))?;
                    if !params.keys.contains(&key) {
                        if params.keys.len() == max_keys {
                            return Err(bad(
                                "too_many_keys",
                                format!("at most {max_keys} keys per request"),
                            ));
                        }
                        params.keys.push(key);
                    }
                    continue;
                }
                other => {
                    return Err(bad(
                        "invalid_query",
                        format!("unknown query parameter {other:?}"),
                    ))
                }
            };
            if slot.replace(value.into_owned()).is_some() {
                return Err(bad(
                    "invalid_query",
                    format!("query parameter {name:?} is given twice"),
                ));
            }
        }
        Ok(params)
    }

    /// The range asked for: explicit, defaulted, or from the cursor.
    fn range(&self, limits: &ReadLimits, now: i64) -> Result<(i64, i64), Refusal> {
        let (from, to) = if let Some(cursor) = &self.cursor {
            if self.from.is_some() || self.to.is_some() {
                return Err(bad(
                    "invalid_query",
                    "`cursor` continues a range: give it without `from` and `to`",
                ));
            }
            parse_cursor(cursor)
                .ok_or_else(|| bad("invalid_cursor", "`cursor` is not one this API handed out"))?
        } else {
            resolve_range(self.from.as_deref(), self.to.as_deref(), now)
                .map_err(|(code, message)| bad(code, message))?
        };
        if to - from > limits.max_range_ms {
            return Err(bad(
                "range_too_long",
                format!(
                    "`to` - `from` is {}, at most {} may be read at once (--read-max-range); split the range",
                    human_ms(to - from),
                    human_ms(limits.max_range_ms)
                ),
            ));
        }
        Ok((from, to))
    }

    fn limit(&self, limits: &ReadLimits) -> Result<usize, Refusal> {
        match &self.limit {
            None => Ok(limits.page_size),
            Some(text) => match text.parse::<usize>() {
                Ok(limit) if (1..=limits.page_size).contains(&limit) => Ok(limit),
                _ => Err(bad(
                    "invalid_limit",
                    format!(
                        "`limit` must be a whole number from 1 to {}",
                        limits.page_size
                    ),
                )),
            },
        }
    }
}

fn human_ms(ms: i64) -> String {
    const DAY: i64 = 86_400_000;
    const HOUR: i64 = 3_600_000;
    match ms {
        ms if ms > 0 && ms % DAY == 0 => format!("{} days", ms / DAY),
        ms if ms > 0 && ms % HOUR == 0 => format!("{} hours", ms / HOUR),
        ms => u64::try_from(ms)
            .map(|ms| humantime::format_duration(Duration::from_millis(ms)).to_string())
            .unwrap_or_else(|_| format!("{ms}ms")),
    }
}

/// The store, the bounds, and a short-lived copy of what the store says about its rows.
struct ReadApi {
    store: Arc<dyn WindowStore>,
    limits: ReadLimits,
    permits: Semaphore,
    view: Mutex<Option<(Instant, StoreView)>>,
}

impl ReadApi {
    /// The store's view, read again every [`METADATA_TTL`]. If reading fails, the last
    /// one read is used while it exists.
    async fn view(&self) -> Result<StoreView, SinkError> {
        let mut cached = self.view.lock().await;
        if let Some((read_at, view)) = cached.as_ref() {
            if read_at.elapsed() < METADATA_TTL {
                return Ok(view.clone());
            }
        }
        match StoreView::load(&*self.store).await {
            Ok(view) => {
                *cached = Some((Instant::now(), view.clone()));
                Ok(view)
            }
            Err(err) => match cached.as_ref() {
                Some((_, view)) => {
                    tracing::warn!(%err, "re-reading the store's settings failed; using the last ones");
                    Ok(view.clone())
                }
                None => Err(err),
            },
        }
    }

    async fn answer(&self, request: &http::Request<()>) -> Result<String, Refusal> {
        if request.method() != http::Method::GET {
            return Err(Refusal {
                status: StatusCode::METHOD_NOT_ALLOWED,
                code: "method_not_allowed",
                message: "use GET".into(),
            });
        }
        let path = request.uri().path();
        let query = request.uri().query().unwrap_or("");
        let now = now_ms();
        if path == "/v1/windows" {
            let params = Params::parse(query, true, self.limits.max_keys)?;
            if params.keys.is_empty() {
                return Err(bad(
                    "missing_key",
                    "name at least one key: /v1/windows?key=<uuid>&key=<uuid>",
                ));
            }
            let range = params.range(&self.limits, now)?;
            return self.answer_keys(&params.keys, range, now).await;
        }
        let Some(key_text) = path.strip_prefix("/v1/windows/") else {
            return Err(Refusal {
                status: StatusCode::NOT_FOUND,
                code: "not_found",
                message: "use /v1/windows/{key} or /v1/windows?key=".into(),
            });
        };
        let key = Uuid::try_parse(key_text)
            .map_err(|_| bad("invalid_key", "the path must end in a UUID"))?;
        let params = Params::parse(query, false, self.limits.max_keys)?;
        let range = params.range(&self.limits, now)?;
        let limit = params.limit(&self.limits)?;
        self.answer_key(key, range, limit, params.cursor.is_none(), now)
            .await
    }

    /// Waits (briefly) for a store-read slot.
    async fn permit(&self) -> Result<tokio::sync::SemaphorePermit<'_>, Refusal> {
        let overloaded = || Refusal {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "overloaded",
            message: format!(
                "{} store reads are already running; retry shortly",
                self.limits.concurrency
            ),
        };
        match tokio::time::timeout(self.limits.queue_timeout, self.permits.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(overloaded()),
        }
    }

    async fn answer_key(
        &self,
        key: Uuid,
        range: (i64, i64),
        limit: usize,
        with_total: bool,
        now: i64,
    ) -> Result<String, Refusal> {
        let _permit = self.permit().await?;
        let view = self.view().await?;
        let page = read_page(&*self.store, &view, key, range, limit, with_total).await?;
        let mut out = String::with_capacity(160 + page.windows.len() * 150);
        let mut buffer = Uuid::encode_buffer();
        let key_text: &str = key.hyphenated().encode_lower(&mut buffer);
        out.push_str(r#"{"key":""#);
        out.push_str(key_text);
        out.push_str("\",");
        push_field_time(&mut out, "from", range.0);
        out.push(',');
        push_field_time(&mut out, "to", range.1);
        if let Some(expired) = view.expired_before(now) {
            out.push(',');
            push_field_time(&mut out, "expired_before", expired);
        }
        if let Some(total) = &page.total {
            out.push_str(r#","total":"#);
            total_json(&mut out, total);
        }
        out.push_str(r#","windows":["#);
        for (i, window) in page.windows.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            if window.key == key {
                window_json_keyed(&mut out, key_text, window);
            } else {
                window_json(&mut out, window);
            }
        }
        out.push(']');
        if let Some(next) = page.next_ms {
            out.push_str(r#","next":""#);
            out.push_str(&cursor(next, range.1));
            out.push('"');
        }
        out.push('}');
        Ok(out)
    }

    async fn answer_keys(
        &self,
        keys: &[Uuid],
        range: (i64, i64),
        now: i64,
    ) -> Result<String, Refusal> {
        // One slot for the whole request: its keys are read one after the other.
        let _permit = self.permit().await?;
        let view = self.view().await?;
        let mut out = String::with_capacity(160 + keys.len() * 140);
        out.push('{');
        push_field_time(&mut out, "from", range.0);
        out.push(',');
        push_field_time(&mut out, "to", range.1);
        if let Some(expired) = view.expired_before(now) {
            out.push(',');
            push_field_time(&mut out, "expired_before", expired);
        }
        out.push_str(r#","keys":["#);
        let mut buffer = Uuid::encode_buffer();
        for (i, key) in keys.iter().enumerate() {
            let total = read_total(&*self.store, &view, *key, range).await?;
            if i > 0 {
                out.push(',');
            }
            out.push_str(r#"{"key":""#);
            out.push_str(key.hyphenated().encode_lower(&mut buffer));
            out.push_str(r#"","total":"#);
            total_json(&mut out, &total);
            out.push('}');
        }
        out.push_str("]}");
        Ok(out)
    }
}

/// The handler the ingest edge routes `GET /v1/windows` and `/v1/windows/...` to.
pub fn handler(store: Arc<dyn WindowStore>, limits: ReadLimits) -> tally_ingest::ReadHandler {
    let api = Arc::new(ReadApi {
        store,
        limits,
        permits: Semaphore::new(limits.concurrency),
        view: Mutex::new(None),
    });
    Arc::new(move |request: http::Request<()>| {
        let api = Arc::clone(&api);
        Box::pin(async move {
            // The live page's static files come through the same hook (tally/src/ui.rs).
            let path = request.uri().path();
            if request.method() == http::Method::GET && (path == "/ui" || path.starts_with("/ui/"))
            {
                return crate::ui::answer(path);
            }
            match api.answer(&request).await {
                Ok(body) => respond(StatusCode::OK, body),
                Err(refusal) => {
                    let retry = refusal.status == StatusCode::SERVICE_UNAVAILABLE;
                    let body = serde_json::json!({
                        "error": refusal.code,
                        "message": refusal.message,
                    })
                    .to_string();
                    let mut response = respond(refusal.status, body);
                    if retry {
                        response.headers_mut().insert(
                            http::header::RETRY_AFTER,
                            http::HeaderValue::from_static("1"),
                        );
                    }
                    response
                }
            }
        })
    })
}

fn respond(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
