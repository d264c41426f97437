//! `meshctl monitor`: the data plane's events as they happen (drops with
//! their reason, new flows with the backend chosen), from the agent's
//! control socket (`crate::monitor`), one line each.

use std::{
    io::{BufRead, BufReader, Write},
    path::Path,
    time::{Duration, Instant},
};

use super::CtlError;

/// What to show, and for how long.
pub struct Filter<'a> {
    pub drops: bool,
    pub service: Option<&'a str>,
    pub node: Option<&'a str>,
    pub count: Option<usize>,
    pub seconds: Option<f64>,
    pub json: bool,
}

/// Streams events to stdout until the count or the time is reached (or
/// the agent goes away); says how many it showed.
pub fn monitor(path: &Path, f: &Filter) -> Result<String, CtlError> {
    let agent = |source| CtlError::Agent {
        path: path.to_owned(),
        source,
    };
    let mut s = std::os::unix::net::UnixStream::connect(path).map_err(agent)?;
    s.write_all(b"monitor\n").map_err(agent)?;
    let until = f
        .seconds
        .map(|secs| Instant::now() + Duration::from_secs_f64(secs.clamp(0.1, 86_400.0)));
    let mut lines = BufReader::new(s.try_clone().map_err(agent)?);
    let mut shown = 0usize;
    let mut out = std::io::stdout().lock();
    let mut line = String::new();
    loop {
        if let Some(u) = until {
            let left = u.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            s.set_read_timeout(Some(left)).map_err(agent)?;
        }
        line.clear();
        match lines.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break;
            }
            Err(e) => return Err(agent(e)),
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line.trim()) else {
            continue;
        };
        if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
            return Err(CtlError::Usage(e.to_owned()));
        }
        if !wanted(&v, f) {
            continue;
        }
        let text = if f.json {
            line.trim().to_string()
        } else {
            render(&v)
        };
        if writeln!(out, "{text}").is_err() {
            break;
        }
        let _ = out.flush();
        if v["kind"] != "lost" {
            shown += 1;
        }
        if f.count.is_some_and(|c| shown >= c) {
            break;
        }
    }
    Ok(if f.json {
        String::new()
    } else {
        format!("-- {shown} events")
    })
}

fn wanted(v: &serde_json::Value, f: &Filter) -> bool {
    let kind = v["kind"].as_str().unwrap_or("");
    if kind == "lost" {
        return true;
    }
    if f.drops && kind != "drop" {
        return false;
    }
    let s = |k: &str| v[k].as_str().unwrap_or("");
    if let Some(svc) = f.service
        && s("service") != svc
        && !s("vip").starts_with(svc)
        && !s("dst").starts_with(svc)
    {
        return false;
    }
    if let Some(node) = f.node
        && s("node") != node
    {
        return false;
    }
    true
}

/// `TIME  SRC -> DST PROTO VERDICT (why)`.
fn render(v: &serde_json::Value) -> String {
    let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
    let ms = v["ts_ms"].as_u64().unwrap_or(0);
    let t = ms / 1000 % 86_400;
    let time = format!(
        "{:02}:{:02}:{:02}.{:03}",
        t / 3600,
        t / 60 % 60,
        t % 60,
        ms % 1000
    );
    match v["kind"].as_str().unwrap_or("") {
        "drop" => format!(
            "{time}  {} -> {} {} DROP ({})",
            s("src"),
            s("dst"),
            s("proto"),
            s("reason")
        ),
        "flow" => {
            let mut where_ = s("service");
            if !s("node").is_empty() {
                where_ = format!("{where_} on {}/{}", s("node"), s("container"));
            }
            format!(
                "{time}  {} -> {} {} NEW FLOW -> {} ({where_})",
                s("src"),
                s("dst"),
                s("proto"),
                s("backend")
            )
        }
        "lost" => format!(
            "-- {} events lost ({})",
            v["count"].as_u64().unwrap_or(0),
            s("why")
        ),
        other => format!("{time}  {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_render_as_one_line_and_filters_apply() {
        let drop: serde_json::Value = serde_json::from_str(
            r#"{"kind":"drop","ts_ms":3723004,"src":"10.42.1.5:1","dst":"10.43.0.9:80","proto":"tcp","reason":"tc_spoofed"}"#,
        )
        .expect("json");
        assert_eq!(
            render(&drop),
            "01:02:03.004  10.42.1.5:1 -> 10.43.0.9:80 tcp DROP (tc_spoofed)"
        );
        let flow: serde_json::Value = serde_json::from_str(
            r#"{"kind":"flow","ts_ms":0,"src":"a","dst":"b","proto":"tcp","backend":"c","service":"web","vip":"10.43.0.9:80/tcp","node":"n2","container":"w2"}"#,
        )
        .expect("json");
        assert_eq!(
            render(&flow),
            "00:00:00.000  a -> b tcp NEW FLOW -> c (web on n2/w2)"
        );
        let f = |drops, service, node| Filter {
            drops,
            service,
            node,
            count: None,
            seconds: None,
            json: false,
        };
        assert!(wanted(&drop, &f(true, None, None)));
        assert!(!wanted(&flow, &f(true, None, None)));
        assert!(wanted(&flow, &f(false, Some("web"), Some("n2"))));
        assert!(!wanted(&flow, &f(false, Some("db"), None)));
        assert!(wanted(&drop, &f(false, Some("10.43.0.9"), None)));
    }
}
