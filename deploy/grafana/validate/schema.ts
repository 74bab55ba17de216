// The shapes the dashboards are type-checked against, built from @grafana/schema.
//
// @grafana/schema ships TypeScript types only (no JSON schema, no CUE): the classic
// dashboard JSON model (`Dashboard`, `Panel`, `RowPanel`, `VariableModel`, ...) and
// each core panel plugin's `Options`/`FieldConfig`. gen-ts.mjs turns every dashboard
// JSON file into a .ts file where each panel is an object literal checked with
// `satisfies` against the type for its panel `type`, and the dashboard against
// `DashboardShape`. Object literals get TypeScript's excess-property checks, so a
// misspelt field fails as well as a field of the wrong type.
import type {
  Dashboard,
  DataQuery,
  DataSourceRef,
  FieldConfig,
  FieldConfigSource,
  Panel,
  RowPanel,
} from '@grafana/schema';
import type * as BarGauge from '@grafana/schema/dist/esm/raw/composable/bargauge/panelcfg/x/BarGaugePanelCfg_types.gen';
import type * as Stat from '@grafana/schema/dist/esm/raw/composable/stat/panelcfg/x/StatPanelCfg_types.gen';
import type * as Table from '@grafana/schema/dist/esm/raw/composable/table/panelcfg/x/TablePanelCfg_types.gen';
import type * as TimeSeries from '@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen';

/**
 * The JSON form of a type: TypeScript string enums (FieldColorModeId, ThresholdsMode,
 * BigValueColorMode, ...) become the union of their values, since JSON holds
 * "palette-classic", never `FieldColorModeId.PaletteClassic`. Numeric enums
 * (VariableRefresh, VariableHide, VariableSort, DashboardCursorSync) stay as they are:
 * a numeric literal is assignable to them only if it is one of their values.
 */
export type Json<T> = T extends string
  ? `${T}`
  : T extends number | boolean | null | undefined
    ? T
    : T extends ReadonlyArray<infer U>
      ? Array<Json<U>>
      : T extends object
        ? { [K in keyof T]: Json<T[K]> }
        : T;

/**
 * A Prometheus query. @grafana/schema has no type for the Prometheus data source's
 * query (it is not a core-plugin schema there), so this is the common `DataQuery`
 * plus the fields Grafana's Prometheus query editor saves.
 */
export interface PromQuery extends DataQuery {
  datasource?: DataSourceRef;
  expr: string;
  legendFormat?: string;
  instant?: boolean;
  range?: boolean;
  format?: 'time_series' | 'table' | 'heatmap';
  editorMode?: 'code' | 'builder';
  interval?: string;
  intervalFactor?: number;
  exemplar?: boolean;
}

/** Panels whose plugin has no custom field config (stat, bargauge). */
type NoCustom = Record<string, never>;

/**
 * A panel of one plugin type. Options and custom field config are `Partial`: Grafana
 * fills in the defaults of whatever a saved dashboard leaves out, so only the fields
 * present are checked (names and types, not presence).
 */
type PanelOf<Type extends string, Options, Custom> = Json<
  Omit<Panel, 'type' | 'options' | 'fieldConfig' | 'targets'> & {
    type: Type;
    options?: Partial<Options>;
    fieldConfig?: Omit<FieldConfigSource, 'defaults'> & {
      defaults: Omit<FieldConfig, 'custom'> & { custom?: Partial<Custom> };
    };
    targets: PromQuery[];
  }
>;

/** The panel types the dashboards may use; gen-ts.mjs refuses any other. */
export interface PanelTypes {
  timeseries: PanelOf<'timeseries', TimeSeries.Options, TimeSeries.FieldConfig>;
  stat: PanelOf<'stat', Stat.Options, NoCustom>;
  bargauge: PanelOf<'bargauge', BarGauge.Options, NoCustom>;
  table: PanelOf<'table', Table.Options, Table.FieldConfig>;
  row: Json<RowPanel>;
}

/** The whole dashboard: the classic dashboard JSON model of @grafana/schema. */
export type DashboardShape = Json<Dashboard>;
