//! SVG plots of a run (stock per terminal over time, the propagation latency CDF) and of a
//! comparison (customers refused while the stand had stock, over the game, per configuration).

use crate::report::Report;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Write `stock.svg` and `propagation_cdf.svg` for `report` into `dir`; returns the paths.
pub fn write(report: &Report, dir: &Path) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(dir).map_err(err)?;
    let stock = dir.join(format!(
        "stock-{}-{}.svg",
        report.scenario,
        report.config.replace('/', "-")
    ));
    let cdf = dir.join(format!(
        "propagation-cdf-{}-{}.svg",
        report.scenario,
        report.config.replace('/', "-")
    ));
    stock_plot(report, &stock)?;
    cdf_plot(report, &cdf)?;
    Ok(vec![stock, cdf])
}

fn stock_plot(report: &Report, path: &Path) -> Result<(), String> {
    let root = SVGBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let minutes = report.game_minutes.max(1) as f64;
    let ymax = report
        .samples
        .iter()
        .flat_map(|s| {
            s.terminal_rights
                .iter()
                .copied()
                .chain([s.pool_available, s.truth])
        })
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let ymin = report
        .samples
        .iter()
        .flat_map(|s| {
            s.terminal_rights
                .iter()
                .copied()
                .chain([s.pool_available, s.truth])
        })
        .min()
        .unwrap_or(0)
        .min(0) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Stock over time — {} {} (seed {})",
                report.scenario, report.config, report.seed
            ),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..minutes, ymin..ymax * 1.05)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("game time (min)")
        .y_desc("units (Σ over items)")
        .draw()
        .map_err(err)?;
    // A replacement terminal appears in the samples from the moment it joins.
    let n = report
        .samples
        .iter()
        .map(|s| s.terminal_rights.len())
        .max()
        .unwrap_or(0);
    for t in 0..n {
        let color = Palette99::pick(t).to_rgba();
        chart
            .draw_series(LineSeries::new(
                report.samples.iter().filter_map(|s| {
                    Some((s.t_ms as f64 / 60_000.0, *s.terminal_rights.get(t)? as f64))
                }),
                color.stroke_width(1),
            ))
            .map_err(err)?
            .label(format!("till {} rights", t + 1))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], color));
    }
    chart
        .draw_series(LineSeries::new(
            report
                .samples
                .iter()
                .map(|s| (s.t_ms as f64 / 60_000.0, s.pool_available as f64)),
            BLACK.stroke_width(2),
        ))
        .map_err(err)?
        .label("available (pool view)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], BLACK));
    chart
        .draw_series(LineSeries::new(
            report
                .samples
                .iter()
                .map(|s| (s.t_ms as f64 / 60_000.0, s.truth as f64)),
            RED.stroke_width(2),
        ))
        .map_err(err)?
        .label("ground truth")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], RED));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

fn cdf_plot(report: &Report, path: &Path) -> Result<(), String> {
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let v = &report.latencies_ms;
    let xmax = v.last().copied().unwrap_or(1).max(1) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Sale → pool propagation CDF — {} {}",
                report.scenario, report.config
            ),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((1.0..xmax * 1.1).log_scale(), 0.0..1.0)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("latency (ms, log)")
        .y_desc("fraction of sales")
        .draw()
        .map_err(err)?;
    let n = v.len().max(1) as f64;
    chart
        .draw_series(LineSeries::new(
            v.iter()
                .enumerate()
                .map(|(i, l)| ((*l).max(1) as f64, (i + 1) as f64 / n)),
            BLUE.stroke_width(2),
        ))
        .map_err(err)?;
    root.present().map_err(err)
}

/// One line of the refusals plot: a configuration and the times (ms) of its refusals.
pub type RefusalSeries = (String, Vec<u64>);

/// Write `refusals-<scenario>.svg`: per configuration, the cumulative number of customers
/// refused while the stand still had what they wanted, over the game (all seeds together).
pub fn write_refusals(
    scenario: &str,
    game_minutes: u64,
    series: &[RefusalSeries],
    dir: &Path,
) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(err)?;
    let path = dir.join(format!("refusals-{scenario}.svg"));
    let root = SVGBackend::new(&path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let ymax = series
        .iter()
        .map(|(_, v)| v.len())
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let minutes = game_minutes.max(1) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Customers refused while stock was left — {scenario}"),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..minutes, 0.0..ymax * 1.05)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("game time (min)")
        .y_desc("refused, cumulative (all seeds)")
        .draw()
        .map_err(err)?;
    for (i, (label, times)) in series.iter().enumerate() {
        let mut t = times.clone();
        t.sort_unstable();
        let colour = Palette99::pick(i).stroke_width(2);
        let mut points = vec![(0.0, 0.0)];
        for (n, ms) in t.iter().enumerate() {
            let x = *ms as f64 / 60_000.0;
            points.push((x, n as f64));
            points.push((x, (n + 1) as f64));
        }
        points.push((minutes, t.len() as f64));
        chart
            .draw_series(LineSeries::new(points, colour))
            .map_err(err)?
            .label(label.clone())
            .legend(move |(x, y)| {
                PathElement::new(
                    vec![(x, y), (x + 20, y)],
                    Palette99::pick(i).stroke_width(2),
                )
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    drop(chart);
    drop(root);
    Ok(path)
}
