//! SVG plots of the scaling curves (plotters).

use std::path::Path;

use anyhow::{Context as _, Result};
use plotters::prelude::*;

use crate::cost::ScalingPoint;

/// One plot: established and new-flow cost against `x` (log scale).
pub fn scaling_svg(path: &Path, title: &str, x_label: &str, points: &[ScalingPoint]) -> Result<()> {
    if points.is_empty() {
        return Ok(());
    }
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE).context("drawing")?;
    let x_max = points.iter().map(|p| p.x).max().unwrap_or(1).max(2) as f64 * 1.5;
    let y_max = points
        .iter()
        .map(|p| p.established_ns.max(p.new_flow_ns))
        .fold(0.0, f64::max)
        * 1.25;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((0.8f64..x_max).log_scale(), 0f64..y_max.max(1.0))
        .context("drawing")?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc("ns per packet (kernel-reported, median)")
        .draw()
        .context("drawing")?;
    let series = [
        (
            "established flow",
            BLUE,
            points
                .iter()
                .map(|p| (p.x.max(1) as f64, p.established_ns))
                .collect::<Vec<_>>(),
        ),
        (
            "new flow",
            RED,
            points
                .iter()
                .map(|p| (p.x.max(1) as f64, p.new_flow_ns))
                .collect(),
        ),
    ];
    for (label, color, data) in series {
        chart
            .draw_series(LineSeries::new(data.clone(), color.stroke_width(2)))
            .context("drawing")?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        chart
            .draw_series(
                data.into_iter()
                    .map(|(x, y)| Circle::new((x, y), 3, color.filled())),
            )
            .context("drawing")?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .context("drawing")?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))
}
