// The class choices of the page and the labels they send to generator.onnx, from model.json's num_classes and
// null_label (export.json's: classes 0..num_classes-1, the null label for "no label"). Plain functions without the
// DOM, so that node can check them (tests/test_web.py).

// The <select> options as [value, text]: the classes in turn (with two or more), each class, and the null label
// ("none") where the model has one. A one-class model (a diffusers model without classes) has "none" first: its
// class 0 and the null label are the same network, and "none" runs it once per step instead of twice.
export function classChoices(meta) {
  const k = meta.num_classes;
  if (!Number.isInteger(k) || k < 1) throw new RangeError(`model.json: num_classes ${k} is not an integer >= 1`);
  const hasNull = Number.isInteger(meta.null_label);
  const choices = [];
  if (k > 1) choices.push(["turn", `0-${k - 1} in turn`]);
  for (let c = 0; c < k; c++) choices.push([String(c), String(c)]);
  if (hasNull && k > 1) choices.push(["none", "none (unconditional)"]);
  if (hasNull && k === 1) choices.unshift(["none", "none (unconditional)"]);
  return choices;
}

// The (count,) int64 labels of a choice: "turn" (0..num_classes-1 in turn), "none" (the null label) or a class
// "0".."num_classes-1"; a RangeError for anything else (a label outside the model's classes is never sent).
export function labelsOf(meta, choice, count) {
  const k = meta.num_classes;
  let label;
  if (choice === "turn") {
    label = (i) => i % k;
  } else if (choice === "none") {
    if (!Number.isInteger(meta.null_label)) throw new RangeError("this model has no null label: choose a class");
    label = () => meta.null_label;
  } else {
    const c = /^[0-9]+$/.test(choice) ? Number(choice) : NaN;
    if (!Number.isInteger(c) || c >= k) throw new RangeError(`class must be an integer in 0..${k - 1}, or none`);
    label = () => c;
  }
  const labels = new BigInt64Array(count);
  for (let i = 0; i < count; i++) labels[i] = BigInt(label(i));
  return labels;
}
