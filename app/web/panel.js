// The box panel (gr.HTML js_on_load): a row selects its box; hovering a row lights the box up.
const rowOf = (e) => e.target.closest && e.target.closest('[data-box-index]');
element.addEventListener('click', (e) => {
  const row = rowOf(e);
  if (row) trigger('select_box', { index: Number(row.dataset.boxIndex) });
});
element.addEventListener('keydown', (e) => {
  const row = rowOf(e);
  if (row && (e.key === 'Enter' || e.key === ' ')) {
    e.preventDefault();
    trigger('select_box', { index: Number(row.dataset.boxIndex) });
  }
});
element.addEventListener('pointerover', (e) => {
  const row = rowOf(e);
  if (window.vl2Canvas) window.vl2Canvas.hover(row ? Number(row.dataset.boxIndex) : null, e);
});
element.addEventListener('pointerleave', () => window.vl2Canvas && window.vl2Canvas.hover(null));
