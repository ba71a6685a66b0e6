//! The benchmark's chart (SVG, drawn with plotters): throughput of every run side by side,
//! and the latency percentiles of the fixed-rate run.

use std::path::Path;

use plotters::prelude::*;

/// Draws `throughput` (label, commands per second) and `latency` (label, milliseconds)
/// as two bar panels into `path`.
pub(super) fn draw(
    path: &Path,
    title: &str,
    throughput: &[(String, f64)],
    latency: &[(String, f64)],
) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1200, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_error)?;
    let root = root.titled(title, ("sans-serif", 20)).map_err(draw_error)?;
    let (left, right) = root.split_horizontally(780);
    bars(
        &left,
        "Throughput (commands/s)",
        throughput,
        &RGBColor(46, 110, 170),
        |v| format!("{:.0}", v),
    )?;
    bars(
        &right,
        "End-to-end latency (ms)",
        latency,
        &RGBColor(200, 110, 40),
        |v| format!("{v:.1}"),
    )?;
    root.present().map_err(draw_error)?;
    Ok(())
}

fn bars<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    caption: &str,
    data: &[(String, f64)],
    color: &RGBColor,
    label: impl Fn(f64) -> String,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    if data.is_empty() {
        return Ok(());
    }
    let max = data.iter().map(|(_, v)| *v).fold(0.0, f64::max).max(1.0);
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((0..data.len() - 1).into_segmented(), 0.0..max * 1.15)
        .map_err(draw_error)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(data.len())
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => data.get(*i).map(|d| d.0.clone()).unwrap_or_default(),
            _ => String::new(),
        })
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(draw_error)?;
    chart
        .draw_series(
            Histogram::vertical(&chart)
                .style(color.filled())
                .margin(14)
                .data(data.iter().enumerate().map(|(i, (_, v))| (i, *v))),
        )
        .map_err(draw_error)?;
    chart
        .draw_series(data.iter().enumerate().map(|(i, (_, v))| {
            Text::new(
                label(*v),
                (SegmentValue::CenterOf(i), *v + max * 0.03),
                ("sans-serif", 13).into_font().color(&BLACK),
            )
        }))
        .map_err(draw_error)?;
    Ok(())
}

fn draw_error<E: std::error::Error + Send + Sync + 'static>(e: E) -> anyhow::Error {
    anyhow::anyhow!("cannot draw the chart: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_an_svg_with_every_label() {
        let dir = std::env::temp_dir().join(format!("cmdproc-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bench.svg");
        draw(
            &path,
            "cmdproc bench",
            &[("uniform".into(), 21_000.0), ("naive".into(), 900.0)],
            &[("p50".into(), 9.5), ("p99".into(), 31.0)],
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        for text in ["uniform", "naive", "21000", "p99", "31.0"] {
            assert!(svg.contains(text), "{text} missing from the chart");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
