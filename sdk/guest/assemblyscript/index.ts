// Package root, so that `import { ... } from "@sandbus/guest"` resolves (asc looks for <package>/index.ts).
export * from "./assembly/index";
