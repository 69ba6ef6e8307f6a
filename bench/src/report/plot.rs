//! The SVG plot.

use super::*;

pub(super) const COLORS: [RGBColor; 4] = [
    RGBColor(110, 110, 110),
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
];

/// Six panels: the five data-path figures with conntrack against N (median, min–max bars),
/// and the program's cost per packet against N.
pub fn plot(results: &Results, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (1650, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let root = root
        .titled(
            &format!(
                "portgate vs iptables vs nftables — {} ({})",
                results.meta.date, results.meta.kernel
            ),
            ("sans-serif", 22),
        )
        .map_err(plot_err)?;
    let panels = root.split_evenly((2, 3));
    let ns = &results.meta.ns;
    let (x_lo, x_hi) = (
        *ns.first().unwrap_or(&10) as f64 / 1.5,
        *ns.last().unwrap_or(&100_000) as f64 * 1.5,
    );
    for (panel, metric) in panels.iter().zip(Metric::DATA_PATH) {
        let y_hi = Filter::ALL
            .iter()
            .flat_map(|&f| ns.iter().filter_map(move |&n| results.stat(n, f, metric)))
            .map(|s| s.max)
            .fold(0.0, f64::max)
            * 1.12;
        let mut chart = ChartBuilder::on(panel)
            .caption(metric.title(), ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d((x_lo..x_hi).log_scale(), 0.0..y_hi.max(1e-9))
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("N (allowed ports)")
            .x_label_formatter(&|x| num(*x))
            .y_label_formatter(&|y| num(*y))
            .light_line_style(RGBColor(245, 245, 245))
            .draw()
            .map_err(plot_err)?;
        for (i, filter) in Filter::ALL.iter().enumerate() {
            let color = COLORS[i];
            let stats: Vec<(f64, Stat)> = ns
                .iter()
                .filter_map(|&n| results.stat(n, *filter, metric).map(|s| (n as f64, s)))
                .collect();
            // Small horizontal offsets keep the bars of the four filters apart.
            let shift = 1.0 + (i as f64 - 1.5) * 0.04;
            chart
                .draw_series(LineSeries::new(
                    stats.iter().map(|(n, s)| (n * shift, s.median)),
                    color.stroke_width(2),
                ))
                .map_err(plot_err)?
                .label(filter.label())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart
                .draw_series(stats.iter().map(|(n, s)| {
                    ErrorBar::new_vertical(n * shift, s.min, s.median, s.max, color.filled(), 6)
                }))
                .map_err(plot_err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(plot_err)?;
    }

    // Program cost.
    let panel = &panels[5];
    let series: Vec<(String, Vec<(f64, f64)>)> = vec![
        ("new connection, N flows".into(), prog_series(results, 0, 1)),
        ("tracked, N flows".into(), prog_series(results, 0, 2)),
        (
            "new connection, 1 M flows".into(),
            prog_series(results, 1, 1),
        ),
        ("tracked, 1 M flows".into(), prog_series(results, 1, 2)),
        (
            "floor (clock reads)".into(),
            results
                .prog
                .iter()
                .map(|p| (p.n as f64, p.floor_ns))
                .collect(),
        ),
    ];
    let y_hi = series
        .iter()
        .flat_map(|(_, s)| s.iter().map(|p| p.1))
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max)
        * 1.25;
    let mut chart = ChartBuilder::on(panel)
        .caption("portgate program cost per packet (ns)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((x_lo..x_hi).log_scale(), 0.0..y_hi.max(1.0))
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("N (allow-map entries)")
        .x_label_formatter(&|x| num(*x))
        .y_label_formatter(&|y| num(*y))
        .light_line_style(RGBColor(245, 245, 245))
        .draw()
        .map_err(plot_err)?;
    let palette = [
        RGBColor(44, 160, 44),
        RGBColor(23, 190, 207),
        RGBColor(148, 103, 189),
        RGBColor(255, 127, 14),
        RGBColor(150, 150, 150),
    ];
    for ((label, points), color) in series.into_iter().zip(palette) {
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(plot_err)?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(plot_err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

pub(super) fn prog_series(results: &Results, fill: usize, pick: usize) -> Vec<(f64, f64)> {
    results
        .prog
        .iter()
        .filter_map(|p| {
            let f = p.fills.get(fill)?;
            Some((p.n as f64, if pick == 1 { f.1 } else { f.2 }))
        })
        .collect()
}

pub(super) fn plot_err<E: std::fmt::Debug>(err: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the plot: {err:?}")
}
