//! The three SVG plots, drawn with `plotters` (SVG backend only: text is emitted as SVG
//! `<text>` elements and laid out by the viewer, so no font file is read or needed).

use anyhow::anyhow;
use plotters::coord::types::RangedCoordf64;
use plotters::element::DashedPathElement;
use plotters::prelude::*;

use super::RunMeta;
use crate::check::FaultTiming;
use crate::record::{Fault, Sample};

const SIZE: (u32, u32) = (1100, 460);
const FONT: &str = "sans-serif";
const ACKED: RGBColor = RGBColor(31, 119, 180);
const ERRORS: RGBColor = RGBColor(214, 39, 40);
const P50: RGBColor = RGBColor(44, 160, 44);
const P99: RGBColor = RGBColor(148, 103, 189);
const FAULT: RGBColor = RGBColor(90, 90, 90);
const AMBIGUOUS: RGBColor = RGBColor(255, 127, 14);
const HEALING: RGBColor = RGBColor(250, 200, 60);

type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

fn draw_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing a plot: {e}")
}

/// Seconds of `t_ms` since the run started (negative before).
fn secs(meta: &RunMeta, t_ms: u64) -> f64 {
    (t_ms as f64 - meta.started_ms as f64) / 1000.0
}

/// A sample's x: the middle of its bucket, so a value sits over the time it aggregates.
fn mid(meta: &RunMeta, s: &Sample, bucket_ms: f64) -> f64 {
    secs(meta, s.t_ms) + bucket_ms / 2000.0
}

/// The bucket length of the samples: the smallest step between two of them, else 1 s.
fn bucket_ms(samples: &[Sample]) -> u64 {
    samples.windows(2).map(|w| w[1].t_ms.saturating_sub(w[0].t_ms)).filter(|&d| d > 0).min().unwrap_or(1000)
}

/// The x range (seconds since start) covering the run, the samples and the faults.
fn x_range(meta: &RunMeta, samples: &[Sample], faults: &[Fault]) -> (f64, f64) {
    let bucket = bucket_ms(samples);
    let mut lo: f64 = 0.0;
    let mut hi: f64 = meta.duration_ms as f64 / 1000.0;
    for s in samples {
        lo = lo.min(secs(meta, s.t_ms));
        hi = hi.max(secs(meta, s.t_ms + bucket));
    }
    for f in faults {
        lo = lo.min(secs(meta, f.injected_ms));
        hi = hi.max(secs(meta, f.healed_ms.unwrap_or(f.injected_ms)) + 1.0);
    }
    if hi <= lo { (lo, lo + 1.0) } else { (lo, hi) }
}

/// Vertical markers at each fault's injection (dashed line, labelled `#id kind`) and a shaded
/// band until it was healed.
fn draw_faults(chart: &mut Chart<'_, '_>, meta: &RunMeta, faults: &[Fault], y_top: f64) -> anyhow::Result<()> {
    for f in faults {
        if let Some(healed) = f.healed_ms {
            let band = Rectangle::new(
                [(secs(meta, f.injected_ms), 0.0), (secs(meta, healed), y_top)],
                HEALING.mix(0.2).filled(),
            );
            chart.draw_series(std::iter::once(band)).map_err(draw_err)?;
        }
    }
    for (i, f) in faults.iter().enumerate() {
        let x = secs(meta, f.injected_ms);
        let line = DashedPathElement::new(vec![(x, 0.0), (x, y_top)], 6, 4, FAULT.stroke_width(1));
        chart.draw_series(std::iter::once(line)).map_err(draw_err)?;
        // Stagger the labels so that close faults stay readable.
        let y = y_top * (0.985 - 0.065 * (i % 4) as f64);
        let label = match f.shard {
            Some(s) => format!("#{} {} (shard {s})", f.id, f.kind),
            None => format!("#{} {}", f.id, f.kind),
        };
        // Anchored at the marker, 4 px to its right.
        let text = EmptyElement::at((x, y)) + Text::new(label, (4, 0), (FONT, 13).into_font().color(&FAULT));
        chart.draw_series(std::iter::once(text)).map_err(draw_err)?;
    }
    Ok(())
}

/// The series legend, boxed, at `position`.
fn draw_legend<'a, 'b: 'a>(chart: &mut Chart<'a, 'b>, position: SeriesLabelPosition) -> anyhow::Result<()> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 13))
        .draw()
        .map_err(draw_err)
}

/// Splits `(x, y)` points into runs where `keep` holds, so a line is broken across the rest.
fn segments(points: Vec<(f64, f64, bool)>) -> Vec<Vec<(f64, f64)>> {
    let mut out: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut current = Vec::new();
    for (x, y, keep) in points {
        if keep {
            current.push((x, y));
        } else if !current.is_empty() {
            out.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Acked events/s and errors/s over time, with fault markers.
pub(crate) fn throughput_svg(meta: &RunMeta, samples: &[Sample], faults: &[Fault]) -> anyhow::Result<String> {
    let bucket = bucket_ms(samples) as f64;
    let per_s = |n: u64| n as f64 * 1000.0 / bucket;
    let acked: Vec<(f64, f64)> = samples.iter().map(|s| (mid(meta, s, bucket), per_s(s.acked))).collect();
    let errors: Vec<(f64, f64)> = samples.iter().map(|s| (mid(meta, s, bucket), per_s(s.errors))).collect();
    let ambiguous: Vec<(f64, f64)> = samples.iter().map(|s| (mid(meta, s, bucket), per_s(s.ambiguous))).collect();
    let y_max = acked.iter().chain(&errors).chain(&ambiguous).map(|p| p.1).fold(0.0, f64::max);
    let y_top = (y_max * 1.2).max(1.0);
    let (x_lo, x_hi) = x_range(meta, samples, faults);

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("Throughput — {} (seed {})", meta.scenario, meta.seed), (FONT, 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(x_lo..x_hi, 0.0..y_top)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .x_desc("seconds since start")
            .y_desc("events per second")
            .y_label_formatter(&|v| format!("{v:.0}"))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(draw_err)?;
        draw_faults(&mut chart, meta, faults, y_top)?;
        for (name, color, points) in
            [("acked/s", ACKED, acked), ("errors/s", ERRORS, errors), ("ambiguous/s", AMBIGUOUS, ambiguous)]
        {
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(draw_err)?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        }
        draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

/// Ack latency p50 and p99 over time (seconds with no ack leave a hole), with fault markers.
pub(crate) fn latency_svg(meta: &RunMeta, samples: &[Sample], faults: &[Fault]) -> anyhow::Result<String> {
    let bucket = bucket_ms(samples) as f64;
    let point = |s: &Sample, v: f64| (mid(meta, s, bucket), v, s.acked > 0);
    let p50 = segments(samples.iter().map(|s| point(s, s.ack_latency_p50_ms)).collect());
    let p99 = segments(samples.iter().map(|s| point(s, s.ack_latency_p99_ms)).collect());
    let y_max = p50.iter().chain(&p99).flatten().map(|p| p.1).fold(0.0, f64::max);
    let y_top = (y_max * 1.2).max(1.0);
    let (x_lo, x_hi) = x_range(meta, samples, faults);

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("Ack latency — {} (seed {})", meta.scenario, meta.seed), (FONT, 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(x_lo..x_hi, 0.0..y_top)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .x_desc("seconds since start")
            .y_desc("ack latency (ms)")
            .y_label_formatter(&|v| format!("{v:.0}"))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(draw_err)?;
        draw_faults(&mut chart, meta, faults, y_top)?;
        for (name, color, runs) in [("p50", P50, p50), ("p99", P99, p99)] {
            // An empty series carries the legend entry, so it shows even with no data.
            chart
                .draw_series(LineSeries::new(Vec::<(f64, f64)>::new(), color.stroke_width(2)))
                .map_err(draw_err)?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            for run in runs {
                chart.draw_series(LineSeries::new(run, color.stroke_width(2))).map_err(draw_err)?;
            }
        }
        draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

/// One line of [`lines_svg`]; points with a NaN y leave a hole.
#[derive(Debug, Clone)]
pub struct Line {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Colours of [`lines_svg`]'s lines, in order.
const PALETTE: [RGBColor; 5] = [ACKED, AMBIGUOUS, P50, P99, ERRORS];

/// A line chart over seconds (benchmarks' time series), with labelled vertical markers at
/// `(x, label)`; the y axis starts at 0.
pub fn lines_svg(title: &str, y_desc: &str, lines: &[Line], markers: &[(f64, String)]) -> anyhow::Result<String> {
    let xs = || lines.iter().flat_map(|l| l.points.iter().map(|p| p.0)).chain(markers.iter().map(|m| m.0));
    let (x_lo, x_hi) = (xs().fold(f64::INFINITY, f64::min), xs().fold(f64::NEG_INFINITY, f64::max));
    let (x_lo, x_hi) = if x_lo.is_finite() && x_hi > x_lo { (x_lo, x_hi) } else { (0.0, 1.0) };
    let y_max = lines.iter().flat_map(|l| &l.points).map(|p| p.1).filter(|y| y.is_finite()).fold(0.0, f64::max);
    let y_top = (y_max * 1.15).max(1.0);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FONT, 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(x_lo..x_hi, 0.0..y_top)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc(y_desc)
            .y_label_formatter(&|v| format!("{v:.0}"))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(draw_err)?;
        for (x, label) in markers {
            let line = DashedPathElement::new(vec![(*x, 0.0), (*x, y_top)], 6, 4, FAULT.stroke_width(1));
            chart.draw_series(std::iter::once(line)).map_err(draw_err)?;
            let text = EmptyElement::at((*x, y_top * 0.97)) + Text::new(label.clone(), (4, 0), (FONT, 13).into_font());
            chart.draw_series(std::iter::once(text)).map_err(draw_err)?;
        }
        for (i, l) in lines.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            chart
                .draw_series(LineSeries::new(Vec::<(f64, f64)>::new(), color.stroke_width(2)))
                .map_err(draw_err)?
                .label(l.name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            let runs = segments(l.points.iter().map(|&(x, y)| (x, y, y.is_finite())).collect());
            for run in runs {
                chart.draw_series(LineSeries::new(run, color.stroke_width(2))).map_err(draw_err)?;
            }
        }
        draw_legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

/// A bin width of 1, 2 or 5 × 10^k ms giving at most `bins` bins up to `max`.
fn bin_width(max: u64, bins: u64) -> u64 {
    let target = max.div_ceil(bins.max(1)).max(1);
    let mut scale = 1u64;
    loop {
        for step in [1, 2, 5] {
            let w = step * scale;
            if w >= target {
                return w;
            }
        }
        scale = match scale.checked_mul(10) {
            Some(s) => s,
            None => return target,
        };
    }
}

fn histogram(values: &[u64], width: u64, bins: u64) -> Vec<u64> {
    let mut counts = vec![0u64; bins as usize];
    for &v in values {
        let i = ((v / width) as usize).min(counts.len().saturating_sub(1));
        if let Some(c) = counts.get_mut(i) {
            *c += 1;
        }
    }
    counts
}

/// Histogram of failover times (fault → first acked write) and, beside it, of the time to the
/// first emission by the new leader.
pub(crate) fn failover_svg(meta: &RunMeta, timings: &[FaultTiming]) -> anyhow::Result<String> {
    let lost = || timings.iter().filter(|t| t.kind.loses_leader());
    let failover: Vec<u64> = lost().filter_map(|t| t.failover_ms).collect();
    let emission: Vec<u64> = lost().filter_map(|t| t.first_emission_ms).collect();
    let max = failover.iter().chain(&emission).copied().max().unwrap_or(0);
    let width = bin_width(max + 1, 20);
    // One empty bin of margin on the right.
    let bins = (max / width + 2).max(5);
    let fo = histogram(&failover, width, bins);
    let em = histogram(&emission, width, bins);
    let y_top = fo.iter().chain(&em).copied().max().unwrap_or(0).max(1) as f64 * 1.25;
    let x_hi = (bins * width) as f64;

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("Failover over {} faults — {} (seed {})", timings.len(), meta.scenario, meta.seed),
                (FONT, 20),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_hi, 0.0..y_top)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .x_desc("milliseconds after the fault")
            .y_desc("faults")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| if v.fract() == 0.0 { format!("{v:.0}") } else { String::new() })
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(draw_err)?;
        let w = width as f64;
        let bars = |counts: &[u64], left: f64, right: f64| -> Vec<(f64, f64, f64, u64)> {
            counts
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(|(i, &c)| (i as f64 * w + left * w, i as f64 * w + right * w, c as f64, c))
                .collect()
        };
        for (name, color, counts, (left, right)) in [
            ("fault → first acked write", ACKED, &fo, (0.05, 0.5)),
            ("fault → first emission by the new leader", P50, &em, (0.5, 0.95)),
        ] {
            chart
                .draw_series(
                    bars(counts, left, right)
                        .into_iter()
                        .map(|(x0, x1, h, _)| Rectangle::new([(x0, 0.0), (x1, h)], color.mix(0.75).filled())),
                )
                .map_err(draw_err)?
                .label(name)
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], color.mix(0.75).filled()));
        }
        if failover.is_empty() && emission.is_empty() {
            let text = Text::new("no failover observed", (x_hi * 0.4, y_top * 0.55), (FONT, 18).into_font());
            chart.draw_series(std::iter::once(text)).map_err(draw_err)?;
        }
        draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bin_widths_are_round() {
        assert_eq!(bin_width(0, 20), 1);
        assert_eq!(bin_width(20, 20), 1);
        assert_eq!(bin_width(21, 20), 2);
        assert_eq!(bin_width(950, 20), 50);
        assert_eq!(bin_width(1_001, 20), 100);
        assert_eq!(bin_width(30_000, 20), 2_000);
    }

    #[test]
    fn histogram_clamps_to_the_last_bin() {
        assert_eq!(histogram(&[0, 9, 10, 55, 1_000], 10, 6), vec![2, 1, 0, 0, 0, 2]);
    }

    #[test]
    fn segments_break_at_holes() {
        let pts = vec![(0.0, 1.0, true), (1.0, 0.0, false), (2.0, 3.0, true), (3.0, 4.0, true)];
        assert_eq!(segments(pts), vec![vec![(0.0, 1.0)], vec![(2.0, 3.0), (3.0, 4.0)]]);
    }
}
