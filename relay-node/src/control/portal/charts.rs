//! Charts as inline SVG, drawn on the server: every bar carries its value in a `<title>`
//! (shown on hover) and in `data-` attributes, every chart has a legend, an axis with its
//! unit, and a table view of the same numbers.

use super::html::{esc, num};
use std::fmt::Write;

/// How many colours the stylesheet defines (`.s0` … `.s7`); more series reuse them.
const COLOURS: usize = 8;

const W: f64 = 760.0;
const H: f64 = 280.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 16.0;
const BOTTOM: f64 = 40.0;

/// A round axis maximum at or above `max`, and its tick step.
fn axis(max: u64) -> (u64, u64) {
    if max == 0 {
        return (4, 1);
    }
    let raw = max.div_ceil(4);
    let mag = 10u64.pow(raw.ilog10());
    let step = [1, 2, 5, 10]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10 * mag);
    (step * max.div_ceil(step), step)
}

/// Grouped columns: one group per category (e.g. month), one column per series (e.g.
/// platform) side by side — a message between two platforms counts for both, so columns are
/// not stacked.
pub fn grouped_columns(
    id: &str,
    title: &str,
    unit: &str,
    categories: &[String],
    series: &[(String, Vec<u64>)],
    totals_label: &str,
    totals: &[u64],
) -> String {
    let top = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .max()
        .unwrap_or(0);
    let (max, step) = axis(top);
    let plot_w = W - LEFT - RIGHT;
    let plot_h = H - TOP - BOTTOM;
    let slot = plot_w / categories.len().max(1) as f64;
    let group = slot * 0.8;
    let bar = (group / series.len().max(1) as f64).max(1.0);
    let y_of = |v: u64| TOP + plot_h - plot_h * v as f64 / max as f64;
    let mut h = String::with_capacity(4096 + categories.len() * series.len() * 160);
    let _ = write!(
        h,
        "<figure class=\"chart\" id=\"{id}\"><figcaption>{}</figcaption>\
         <svg viewBox=\"0 0 {W} {H}\" role=\"img\" aria-labelledby=\"{id}-desc\" preserveAspectRatio=\"xMidYMid meet\">\
         <desc id=\"{id}-desc\">{}, in {}, by {}; the table view below lists the numbers</desc>",
        esc(title),
        esc(title),
        esc(unit),
        esc(&categories.join(", "))
    );
    // Grid lines and the axis with its unit.
    let mut v = 0;
    while v <= max {
        let y = y_of(v);
        let _ = write!(
            h,
            "<line class=\"grid\" x1=\"{LEFT}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\"/>\
             <text class=\"tick\" x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            W - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            num(v)
        );
        v += step;
    }
    let _ = write!(
        h,
        "<text class=\"unit\" x=\"12\" y=\"{:.1}\" transform=\"rotate(-90 12 {:.1})\" text-anchor=\"middle\">{}</text>",
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0,
        esc(unit)
    );
    for (i, c) in categories.iter().enumerate() {
        let x0 = LEFT + slot * i as f64 + (slot - group) / 2.0;
        let _ = write!(h, "<g class=\"col\" data-category=\"{}\">", esc(c));
        for (k, (name, values)) in series.iter().enumerate() {
            let val = values.get(i).copied().unwrap_or(0);
            if val > 0 {
                let y = y_of(val);
                let _ = write!(
                    h,
                    "<rect class=\"s{}\" x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" \
                     data-series=\"{}\" data-value=\"{val}\"><title>{}, {}: {} {}</title></rect>",
                    k % COLOURS,
                    x0 + bar * k as f64,
                    (bar - 1.0).max(1.0),
                    (TOP + plot_h - y).max(0.5),
                    esc(name),
                    esc(name),
                    esc(c),
                    num(val),
                    esc(unit)
                );
            }
        }
        // The month's name, and its year under the first column and each January.
        let (month, year) = month_parts(c);
        let _ = write!(
            h,
            "<text class=\"tick\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            x0 + group / 2.0,
            H - BOTTOM + 16.0,
            esc(&month)
        );
        if let Some(y) = year.filter(|_| i == 0 || month == "Jan") {
            let _ = write!(
                h,
                "<text class=\"tick\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                x0 + group / 2.0,
                H - BOTTOM + 31.0,
                esc(&y)
            );
        }
        h.push_str("</g>");
    }
    h.push_str("</svg>");
    legend(&mut h, series.iter().map(|(n, _)| n.as_str()));
    // The table view.
    let _ = write!(
        h,
        "<details class=\"table-view\"><summary>Table view: {}</summary><table><caption>{} ({})</caption><thead><tr><th scope=\"col\">Period</th>",
        esc(title),
        esc(title),
        esc(unit)
    );
    for (n, _) in series {
        let _ = write!(h, "<th scope=\"col\">{}</th>", esc(n));
    }
    let _ = write!(
        h,
        "<th scope=\"col\">{}</th></tr></thead><tbody>",
        esc(totals_label)
    );
    for (i, c) in categories.iter().enumerate() {
        let _ = write!(h, "<tr><th scope=\"row\">{}</th>", esc(c));
        for (_, values) in series {
            let _ = write!(h, "<td>{}</td>", num(values.get(i).copied().unwrap_or(0)));
        }
        let total = totals.get(i).copied().unwrap_or(0);
        let _ = write!(h, "<td class=\"total\">{}</td></tr>", num(total));
    }
    h.push_str("</tbody></table></details></figure>");
    h
}

/// Horizontal bars: one per item, longest first as given.
pub fn bars(id: &str, title: &str, unit: &str, items: &[(String, u64)]) -> String {
    let max = items.iter().map(|(_, v)| *v).max().unwrap_or(0).max(1);
    let row = 26.0;
    let label_w = 220.0;
    let height = row * items.len().max(1) as f64 + 28.0;
    let plot_w = W - label_w - 90.0;
    let mut h = String::with_capacity(1024 + items.len() * 300);
    let _ = write!(
        h,
        "<figure class=\"chart\" id=\"{id}\"><figcaption>{}</figcaption>\
         <svg viewBox=\"0 0 {W} {height}\" role=\"img\" aria-labelledby=\"{id}-desc\">\
         <desc id=\"{id}-desc\">{}, in {}; the table view below lists the numbers</desc>",
        esc(title),
        esc(title),
        esc(unit)
    );
    if items.is_empty() {
        let _ = write!(
            h,
            "<text class=\"tick\" x=\"{label_w}\" y=\"20\">no traffic in this period</text>"
        );
    }
    for (i, (label, v)) in items.iter().enumerate() {
        let y = 8.0 + row * i as f64;
        let w = (plot_w * *v as f64 / max as f64).max(if *v > 0 { 1.0 } else { 0.0 });
        let _ = write!(
            h,
            "<text class=\"tick\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\
             <rect class=\"s0\" x=\"{label_w}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{:.1}\" data-series=\"{}\" data-value=\"{v}\">\
             <title>{}: {} {}</title></rect>\
             <text class=\"tick\" x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            label_w - 8.0,
            y + 15.0,
            esc(label),
            row - 8.0,
            esc(label),
            esc(label),
            num(*v),
            esc(unit),
            label_w + w + 6.0,
            y + 15.0,
            num(*v)
        );
    }
    let _ = write!(
        h,
        "<text class=\"unit\" x=\"{label_w}\" y=\"{:.1}\">{} →</text></svg>",
        height - 4.0,
        esc(unit)
    );
    legend(&mut h, [unit].into_iter());
    let _ = write!(
        h,
        "<details class=\"table-view\"><summary>Table view: {}</summary><table><caption>{}</caption>\
         <thead><tr><th scope=\"col\">Domain</th><th scope=\"col\">{}</th></tr></thead><tbody>",
        esc(title),
        esc(title),
        esc(unit)
    );
    for (label, v) in items {
        let _ = write!(
            h,
            "<tr><th scope=\"row\">{}</th><td>{}</td></tr>",
            esc(label),
            num(*v)
        );
    }
    h.push_str("</tbody></table></details></figure>");
    h
}

fn legend<'a>(h: &mut String, names: impl Iterator<Item = &'a str>) {
    h.push_str("<ul class=\"legend\" aria-label=\"Legend\">");
    for (k, n) in names.enumerate() {
        let _ = write!(
            h,
            "<li><span class=\"swatch s{}\" aria-hidden=\"true\"></span>{}</li>",
            k % COLOURS,
            esc(n)
        );
    }
    h.push_str("</ul>");
}

/// `2025-03` → (`Mar`, `2025`); anything else as it is, without a year.
fn month_parts(period: &str) -> (String, Option<String>) {
    const NAMES: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    match period.split_once('-') {
        Some((y, m)) if m.len() == 2 => match m.parse::<usize>() {
            Ok(i @ 1..=12) => (NAMES[i - 1].to_string(), Some(y.to_string())),
            _ => (period.to_string(), None),
        },
        _ => (period.to_string(), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_are_round_and_cover_the_maximum() {
        for (max, want) in [
            (0, (4, 1)),
            (7, (8, 2)),
            (100, (100, 50)),
            (1234, (1500, 500)),
            (99_999, (100_000, 50_000)),
        ] {
            assert_eq!(axis(max), want, "{max}");
        }
    }

    #[test]
    fn every_value_is_in_a_bar_title_and_the_table() {
        let cats = vec!["2025-01".to_string(), "2025-02".to_string()];
        let series = vec![
            ("teams".to_string(), vec![5, 0]),
            ("xmpp <x>".to_string(), vec![7, 11]),
        ];
        let svg = grouped_columns(
            "m",
            "Messages",
            "messages",
            &cats,
            &series,
            "All",
            &[12, 11],
        );
        assert!(svg.contains("<title>teams, 2025-01: 5 messages</title>"));
        assert!(svg.contains("<title>xmpp &lt;x&gt;, 2025-02: 11 messages</title>"));
        assert!(!svg.contains("teams, 2025-02"), "no bar for a zero");
        assert!(
            svg.contains("<td class=\"total\">12</td>")
                && svg.contains("<td class=\"total\">11</td>")
        );
        assert!(svg.contains(">Jan<") && svg.contains(">2025<") && svg.contains(">Feb<"));
        assert_eq!(svg.matches(">2025<").count(), 1, "the year once");
        assert!(svg.contains("class=\"legend\""));
        let b = bars("d", "Top", "messages", &[("a.example".into(), 3)]);
        assert!(b.contains("<title>a.example: 3 messages</title>") && b.contains("<td>3</td>"));
    }
}
