//! `cmdproc migrate`.

use super::Common;

/// Applies the migrations and says so.
pub async fn run(common: &Common) -> anyhow::Result<()> {
    let pool = super::pool(common, 2).await?;
    let n = crate::store::migrate(&pool).await?;
    println!("database is up to date ({n} migrations)");
    Ok(())
}
